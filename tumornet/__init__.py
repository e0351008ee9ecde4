"""tumornet: the paper's model and data layer, pure torch/numpy (no Ray anywhere in it).

Brain Tumor Image Retrieval via Multitask Learning: a 3D CNN trained on T1c MRI for tumor
segmentation plus per-tumor classification tasks; a tumor's RoiPool feature vector is its
retrieval embedding.
"""

__version__ = "0.1.0"
