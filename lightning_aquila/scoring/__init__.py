"""Document scorers for ``lightning-aquila score``: each turns the documents of a prepared
store into one float per document, higher meaning better, which ``datamodules/scores.py``
attaches as a named column.

- ``documents.py``: the documents of a domain in batches, the throughput meter, and the loop
  that runs a scorer over both splits (``score_domain``).
- ``classifier.py``: a fastText classifier (DCLM-style), trained from positive and negative
  text files or loaded from a ``.bin``; score = log-odds of the positive label.
- ``perplexity.py``: a checkpoint of our own model (CCNet-style); score = minus the mean
  token negative log-likelihood of the document (nats), i.e. minus log-perplexity.
"""
