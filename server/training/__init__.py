"""Fine-tuning: jobs, worker process, QLoRA and LongLoRA trainers."""
