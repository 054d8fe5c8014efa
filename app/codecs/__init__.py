"""Wire formats: the one dtype table, JSON lists, raw tensors and .npy, V2 tensors."""
