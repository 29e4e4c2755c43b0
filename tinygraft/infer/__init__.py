"""Using what was trained: predict (a fine-tuned run's outputs), sample (text from a GPT), evaluate (a language
model's loss on a corpus), embed (sentence vectors), export (the Hugging Face and peft layouts)."""
