"""pyro_gbnn: compressed Bayesian neural networks on Pyro and PyTorch."""
