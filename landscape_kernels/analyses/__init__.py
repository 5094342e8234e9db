"""The published analyses, layer 6: one module per paper, each function usable on its own."""
