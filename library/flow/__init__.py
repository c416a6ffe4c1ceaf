"""Flow matching: noise schedules and losses, sampling, prompt files, image generation."""
