"""Training stages: each is a model, a loss and a config, run by ``clopdit_dist.train.trainer``."""
