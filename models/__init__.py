"""Torch model definitions; imported only by export and train, never by the runtime."""
