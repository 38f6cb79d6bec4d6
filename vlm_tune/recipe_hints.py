"""Recipe keys as other tools spell them (transformers' TrainingArguments, peft's LoraConfig, bitsandbytes),
and what to write here instead; the recipe validator suggests these for unknown keys at any depth."""

FOREIGN_KEYS: dict[str, str] = {
    # transformers TrainingArguments / TRL
    "learning_rate": "train.lr",
    "gradient_accumulation_steps": "train.grad_accum",
    "per_device_train_batch_size": "train.batch_size",
    "per_device_eval_batch_size": "eval.batch_size",
    "num_train_epochs": "train.epochs",
    "output_dir": "train.output_dir",
    "lr_scheduler_type": "train.schedule",
    "logging_steps": "train.log_every",
    "save_steps": "train.save_every",
    "eval_steps": "train.eval_every",
    "save_total_limit": "train.keep_checkpoints",
    "resume_from_checkpoint": "train.resume",
    "metric_for_best_model": "train.keep_best",
    "load_best_model_at_end": "train.keep_best",
    "bf16": "train.mixed_precision: bf16",
    "fp16": "train.mixed_precision: fp16",
    "dataloader_num_workers": "data.num_workers",
    "max_seq_length": "data.max_length",
    "model_name_or_path": "model.name_or_path",
    "torch_dtype": "model.dtype",
    # peft LoraConfig
    "r": "components.<name>.rank",
    "lora_r": "components.<name>.rank",
    "lora_alpha": "components.<name>.alpha",
    "lora_dropout": "components.<name>.dropout",
    "target_modules": "components.<name>.targets",
    "use_dora": "components.<name>.variant: dora",
    "use_rslora": "components.<name>.variant: rslora",
    # bitsandbytes
    "load_in_4bit": "model.quantization: {bits: 4}",
    "bnb_4bit_quant_type": "model.quantization.quant_type",
    "bnb_4bit_compute_dtype": "model.quantization.compute_dtype",
    "bnb_4bit_use_double_quant": "model.quantization.double_quant",
}
