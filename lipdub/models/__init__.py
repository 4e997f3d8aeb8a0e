"""Plain nn.Modules whose state-dict names equal the original implementations' names."""
