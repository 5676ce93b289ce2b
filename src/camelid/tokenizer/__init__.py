"""Llama byte-level BPE tokenizers: load (tokenizer.json or Meta's tokenizer.model), train,
encode/decode, the chat format, and save in the Hugging Face layout.

tok = Tokenizer.load("path/to/Llama-3.2-1B")           # or train_tokenizer(texts, 32768)
# (a tokenizer.model is Llama 3's or Llama 4's, told by its rank count; others are refused)
ids = tok.encode("Hello", bos=True)
ids, mask = tok.apply_chat_template(messages, return_assistant_mask=True)
tok.save("out/")                                       # tokenizer.json + tokenizer_config.json
"""

from camelid.tokenizer.bpe import LLAMA3_PATTERN, LLAMA4_PATTERN
from camelid.tokenizer.tokenizer import Tokenizer
from camelid.tokenizer.train import train_tokenizer

__all__ = ["LLAMA3_PATTERN", "LLAMA4_PATTERN", "Tokenizer", "train_tokenizer"]
