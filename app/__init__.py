"""modelport: serve PyTorch models from a registered nn.Module class plus a state_dict file."""
