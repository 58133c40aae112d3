"""Numerical kernels the pipelines need and DALI lacks: the Kaldi-exact log-mel filterbank."""
