"""Hugging Face import / export per model family (`llama`: Llama, Mistral, Qwen2 and PEFT LoRA),
safetensors streaming (`safetensors_io`) and the mmjax model directory (`model_dir`)."""
