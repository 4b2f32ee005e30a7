"""Data domain: IMS recording -> subsampled signals -> feature windows."""
