"""Bake ``llmhub/tiny-random-llama`` and its LoRA adapter ``llmhub/tiny-random-llama-lora`` into a
Hugging Face hub cache (build step of the image).

The model is a real Llama architecture with random weights (hidden 128, 2 layers, 2 heads,
head_dim 64 -- vLLM's CPU attention rejects head_dim 16) and a byte-level BPE tokenizer
trained here on generated English-like text, so vLLM can load and serve it with no hub access.
Everything is seeded, so the same library versions give byte-identical files and the same
revision.

Layout written (what ``huggingface_hub`` resolves offline for ``llmhub/tiny-random-llama``)::

    <cache>/hub/models--llmhub--tiny-random-llama/
        refs/main                      -> "<rev>" (40 hex chars, sha1 over the snapshot files)
        snapshots/<rev>/config.json, generation_config.json, model.safetensors (bf16, ~3 MB),
                        tokenizer.json, tokenizer_config.json, chat_template.jinja
    <cache>/hub/models--llmhub--tiny-random-llama-lora/
        refs/main, snapshots/<rev>/adapter_config.json, adapter_model.safetensors (rank 8, ~130 KB)

Usage: ``python make_tiny_llama.py [CACHE_DIR]`` (default ``$HF_HOME`` or
``/root/.cache/huggingface``).
"""

import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

REPO_ID = "llmhub/tiny-random-llama"
LORA_REPO_ID = "llmhub/tiny-random-llama-lora"
SEED = 20240601
VOCAB_SIZE = 4096
BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

WORDS = """
the a an this that some every many few model host engine instance request token answer
question user deployment cluster server cache memory queue batch stream reply message
river mountain city garden window morning evening winter summer ocean forest bridge road
teacher student doctor farmer writer painter engineer pilot driver child friend neighbor
runs starts stops serves answers reads writes builds moves waits sends takes gives finds
keeps learns brings holds opens closes turns shows calls tells asks needs wants likes sees
quick slow bright dark small large quiet loud warm cold new old early late simple careful
quickly slowly always never often today tomorrow yesterday here there again together
and but or because while when after before under over through between with without from
I you he she it we they is are was were has have had will would can could should must
""".split()
SYLLABLES = "ka lo mi ne ru sa te vo zi ba de fi go hu ja ke li mo nu pa qu re si to un ve wa xi yo ze".split()
PUNCT = [".", ".", ".", "!", "?", ","]


def corpus(rng: random.Random, sentences: int = 40000):
    """Yield English-like lines: real words plus invented ones, numbers and punctuation."""
    invented = sorted({"".join(rng.choices(SYLLABLES, k=rng.randint(2, 4))) for _ in range(3000)})
    lexicon = WORDS * 4 + invented
    for _ in range(sentences):
        words = [rng.choice(lexicon) for _ in range(rng.randint(4, 16))]
        if rng.random() < 0.2:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 9999)))
        words[0] = words[0].capitalize()
        yield " ".join(words) + rng.choice(PUNCT)


def train_tokenizer(rng: random.Random) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[BOS, EOS, PAD, "<|system|>", "<|user|>", "<|assistant|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus(rng)), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        chat_template=CHAT_TEMPLATE,
        model_max_length=2048,
    )


def build(out: Path) -> None:
    rng = random.Random(SEED)
    torch.manual_seed(SEED)
    tokenizer = train_tokenizer(rng)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    # bfloat16: the dtype vLLM's CPU backend runs this model in (it would downcast float32).
    model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    model.generation_config.do_sample = True
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def build_lora(out: Path) -> None:
    """A rank-8 LoRA adapter for the tiny Llama (q/k/v/o projections of both layers), PEFT's layout.

    Written with torch and safetensors alone (no peft needed): ``adapter_config.json`` plus
    ``adapter_model.safetensors`` with keys ``base_model.model.model.layers.<i>.self_attn.<p>.lora_{A,B}.weight``
    (A: rank × in_features, B: out_features × rank), the format vLLM's ``--lora-modules`` loads.
    B is random rather than PEFT's zero initialisation, so the adapter visibly changes the output.
    """
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(SEED + 1)
    rank, hidden, modules = 8, 128, ("q_proj", "k_proj", "v_proj", "o_proj")
    tensors = {}
    for layer in range(2):
        for module in modules:
            key = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, hidden, generator=generator) * 0.05
            tensors[f"{key}.lora_B.weight"] = torch.randn(hidden, rank, generator=generator) * 0.5
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": REPO_ID,
        "r": rank, "lora_alpha": 16, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
        "target_modules": list(modules), "modules_to_save": None, "inference_mode": True,
    }  # fmt: skip
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def bake(cache: Path, repo_id: str, build_into) -> None:
    """Write what ``build_into(dir)`` makes as the ``main`` revision of ``repo_id`` in a hub cache."""
    repo_dir = cache / "hub" / ("models--" + repo_id.replace("/", "--"))
    with tempfile.TemporaryDirectory() as tmp:
        staging = Path(tmp) / "snapshot"
        build_into(staging)
        digest = hashlib.sha1()
        for path in sorted(staging.rglob("*")):
            if path.is_file():
                digest.update(path.relative_to(staging).as_posix().encode() + b"\0" + path.read_bytes())
        rev = digest.hexdigest()
        snapshot = repo_dir / "snapshots" / rev
        shutil.rmtree(snapshot, ignore_errors=True)
        snapshot.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(staging, snapshot)
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(rev)
    files = sorted(p.name for p in snapshot.iterdir())
    print(f"{repo_id} rev {rev}: {', '.join(files)}")


def main() -> None:
    cache = Path(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("HF_HOME", "/root/.cache/huggingface"))
    bake(cache, REPO_ID, build)
    bake(cache, LORA_REPO_ID, build_lora)


if __name__ == "__main__":
    main()
