"""The SASRec surrogate: model, training with early stopping, full-ranking evaluation."""
