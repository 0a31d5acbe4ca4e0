"""The language model: loading, the prompt, generation, decoding and attention capture."""
