"""Tokenizer core: rank-value tokenization (reference, Numba, C++), the corpus pipeline, medians."""
