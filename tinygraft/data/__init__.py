"""Text to batches: tokenizers, vocabulary growth, corpora and the token cache, batchers, the labeled readers
(tables, CoNLL, SQuAD) and the built-in demo task. Nothing here knows a model."""
