"""What each trainer adds to the shared loop: LoRA, full fine-tuning, ControlNet."""
