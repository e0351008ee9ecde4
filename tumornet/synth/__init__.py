"""The synthetic labeled cohort on real brain anatomy: demo and test data, not the method.

`phantom.generate_cohort` writes NIfTI scans, instance masks and a manifest that look like a
radiosurgery archive (metastases, meningiomas, schwannomas on the ICBM152 template);
`lesions` holds the tumor shapes it draws.
"""
