"""Models domain: the model repository of candidate Isolation Forests, trained from the feature windows."""
