"""The K-member model: the member-batched LoRA layer, building and attaching members on one PEFT model, the shared
trunk, the completion-only LM head, model loading and the saved ensemble format."""
