"""A trained state as a model to use: predict and generate, and the Hugging Face export."""
