"""The LLM effort score: prompts, model loading, per-sample LoRA gradient norms."""
