"""Archive embedding: manifest -> tumors -> RoiPool embeddings -> Parquet shards (Ray Data)."""
