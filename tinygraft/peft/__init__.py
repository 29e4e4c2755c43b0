"""Parameter-efficient adapters on any nn.Module, and peft's file layout for them."""
