"""Sample text from a trained run: rebuild the model from the run's config, load a checkpoint's
weights, and decode with temperature and top-k.

Decoding recomputes the whole (cropped) context each token rather than keeping a KV cache: the
model stays free of inference-only state, and at the lengths used to inspect a run the cost is
small.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from distrib.checkpoint.run import load_run
from distrib.errors import ConfigError


def check_sampling(max_new_tokens: int, temperature: float, top_k: int) -> None:
    """Refuse decoding settings that cannot work, naming the `distrib generate` flag."""
    checks = [
        ("--max_new_tokens", max_new_tokens, max_new_tokens >= 0, "an integer >= 0"),
        (
            "--temperature",
            temperature,
            math.isfinite(temperature) and temperature >= 0,
            "a finite number >= 0 (0: greedy decoding)",
        ),
        ("--top_k", top_k, top_k >= 0, "an integer >= 0 (0: sample among all tokens)"),
    ]
    for flag, value, ok, valid in checks:
        if not ok:
            raise ConfigError(f"{flag} must be {valid}, got {value}")


@torch.no_grad()
def sample(
    model: nn.Module,
    prompt_ids: list[int],
    max_new_tokens: int,
    max_seq_len: int,
    temperature: float = 0.8,
    top_k: int = 50,
    generator: torch.Generator | None = None,
    stop_id: int | None = None,
) -> list[int]:
    """Extend `prompt_ids` by up to `max_new_tokens` tokens; temperature 0 is greedy."""
    model.eval()
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    for _ in range(max_new_tokens):
        logits_V = model(ids[:, -max_seq_len:])[0, -1].float()
        if temperature <= 0:
            next_id = logits_V.argmax()
        else:
            logits_V = logits_V / temperature
            if 0 < top_k < logits_V.numel():
                kth = torch.topk(logits_V, top_k).values[-1]
                logits_V = logits_V.masked_fill(logits_V < kth, float("-inf"))
            probs_V = torch.softmax(logits_V, dim=-1)
            next_id = torch.multinomial(probs_V.cpu(), 1, generator=generator)[0].to(device)
        ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
        if stop_id is not None and int(next_id) == stop_id:
            break
    return ids[0].tolist()


def chat_prompt(run_dir: Path, prompt: str, max_seq_len: int) -> str:
    """`prompt` as one user turn followed by the reply prompt, in the chat template the run
    was fine-tuned with (kept in its folder)."""
    from distrib.commands.export import hf_tokenizer
    from distrib.data.chat import TEMPLATE_FILE

    if not (Path(run_dir) / TEMPLATE_FILE).is_file():
        raise ConfigError(
            f"--chat: {run_dir} has no {TEMPLATE_FILE}; only a run trained on chat or "
            "preference data (data.format = chat | preference) has a chat template"
        )
    hf = hf_tokenizer(Path(run_dir) / "tokenizer.json", max_seq_len)
    messages = [{"role": "user", "content": prompt}]
    return hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def generate_text(
    run_dir: Path,
    prompt: str,
    max_new_tokens: int = 64,
    temperature: float = 0.8,
    top_k: int = 50,
    step: int | None = None,
    seed: int = 0,
    device: torch.device | None = None,
    chat: bool = False,
) -> str:
    """Prompt plus continuation, sampled from the run's newest (or `step`'s) checkpoint; with
    `chat`, the prompt is a user turn rendered in the run's chat template."""
    check_sampling(max_new_tokens, temperature, top_k)
    device = device or torch.device("cpu")
    model, tokenizer, cfg = load_run(run_dir, step, device)
    max_seq_len = cfg.model.max_seq_len
    generator = torch.Generator().manual_seed(seed)
    if chat:
        from distrib.data.chat import parsing_special_tokens

        # The template's markup may hold special tokens (<|im_start|>): parse them, as the
        # training data was.
        rendered = chat_prompt(run_dir, prompt, max_seq_len)
        prompt_ids = parsing_special_tokens(tokenizer).encode(rendered).ids
    else:
        prompt_ids = tokenizer.encode(prompt) or [tokenizer.eos_id]
    out = sample(
        model,
        prompt_ids,
        max_new_tokens,
        max_seq_len,
        temperature,
        top_k,
        generator,
        stop_id=tokenizer.eos_id,
    )
    return tokenizer.decode(out)
