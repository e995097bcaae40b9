"""The Python API: ``dbrxq.load(...)`` returns a ready-to-use :class:`DbrxRunner`.

    >>> import dbrxq
    >>> m = dbrxq.load()                      # the small model shipped in the package
    >>> print(m.generate("Once upon a time", max_new_tokens=20))
    >>> m.chat([{"role": "user", "content": "Hi"}])

``m.model`` is the :class:`dbrxq.DbrxForCausalLM` (forward like transformers'), ``m.tokenizer``
the :class:`dbrxq.text.tokenizer.DbrxTokenizer`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from dbrxq.core.errors import TokenizerError
from dbrxq.core.sysinfo import set_threads
from dbrxq.formats.hub import resolve_model_name
from dbrxq.loading.loader import load_model
from dbrxq.model.dbrx import DbrxForCausalLM
from dbrxq.model.kv_cache import check_flavour
from dbrxq.runtime.generate import NO_PENALTIES, GenerationOutput, Penalties, generate
from dbrxq.text.stops import StopMatcher, cut_at_stop
from dbrxq.text.tokenizer import DbrxTokenizer, StreamDecoder


@dataclass
class DbrxRunner:
    model: DbrxForCausalLM
    tokenizer: DbrxTokenizer

    kv_cache: str = "bf16"  # KV cache flavour (dbrxq.model.kv_cache.KV_FLAVOURS)

    @property
    def config(self):
        return self.model.config

    @property
    def offload(self):
        """The dbrxq.runtime.offload.OffloadRuntime when experts are offloaded (stats, cache), else None."""
        return getattr(self.model, "offload", None)

    def generate_ids(self, prompts: Sequence[Sequence[int]], **kwargs) -> GenerationOutput:
        """Token-level generation for a batch of prompts (see dbrxq.runtime.generate.generate)."""
        kwargs.setdefault("stop_tokens", self.stop_tokens)
        kwargs.setdefault("pad_token_id", self.pad_token_id)
        # With offloading the runtime makes the KV cache, within the memory plan.
        kwargs.setdefault("kv_cache", self.offload.kv_factory if self.offload is not None else self.kv_cache)
        if self.offload is not None:  # the prompt's chunk the memory plan's workspace holds
            kwargs.setdefault("prefill_chunk_size", self.offload.plan.prefill_chunk)
        return generate(self.model, prompts, **kwargs)

    @property
    def stop_tokens(self) -> list[int]:
        return sorted(set(self.tokenizer.eos_token_ids) | set(self.model.config.eos_token_ids))

    @property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return 0 if pad is None else pad

    def generate(self, prompt: str | Sequence[str], *, max_new_tokens: int = 64, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 on_text: Callable[[str], None] | None = None, stop: Sequence[str] = (),
                 penalties: Penalties = NO_PENALTIES) -> str | list[str]:
        """Continue one prompt (returns str) or a batch (returns list[str]); stop tokens are dropped.
        ``stop``: strings that end the text (not included; one prompt stops generating at the first,
        a batch is cut there); ``penalties``: repetition / presence / frequency (:class:`Penalties`)."""
        single = isinstance(prompt, str)
        prompts = [prompt] if single else list(prompt)
        ids = [self.tokenizer.encode(p) for p in prompts]
        texts = self._run(ids, on_text, stop=stop, max_new_tokens=max_new_tokens, temperature=temperature,
                          top_k=top_k, top_p=top_p, seed=seed, penalties=penalties)
        return texts[0] if single else texts

    def chat(self, messages: list[dict], *, system_prompt: str | None = None,
             on_text: Callable[[str], None] | None = None, **kwargs) -> str:
        """Reply to a ChatML conversation (DBRX-instruct's template)."""
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, system_prompt=system_prompt)
        return self._run([ids], on_text, **kwargs)[0]

    def _run(self, ids: list[list[int]], on_text, *, stop: Sequence[str] = (), **kwargs) -> list[str]:
        stops = set(self.stop_tokens)
        stream = None
        if on_text is not None or (stop and len(ids) == 1):
            if len(ids) != 1:
                raise ValueError("streaming (on_text) takes a single prompt")
            dec, matcher = StreamDecoder(self.tokenizer), StopMatcher(list(stop))
            said = on_text or (lambda text: None)

            def stream(tok: torch.Tensor) -> bool:  # True ends generation: a stop string was completed
                t = int(tok[0])
                if t in stops:
                    return False
                text, hit = matcher.push(dec.push(t))
                if text:
                    said(text)
                return hit
        self.last_output = out = self.generate_ids(ids, on_token=stream, **kwargs)
        if stream is not None and on_text is not None:
            text, hit = matcher.push(dec.flush())
            text += "" if hit else matcher.flush()
            if text:
                on_text(text)
        return [cut_at_stop(self.tokenizer.decode([t for t in seq if t not in stops]), stop)
                for seq in out.sequences]


def load(path_or_repo_id: str | Path | None = None, *, device: str | torch.device | None = "cpu",
         dtype: str | torch.dtype | None = None, revision: str | None = None,
         backend: str | None = None, gpu_memory: str | int | None = None, cpu_memory: str | int | None = None,
         context: int | None = None, batch_size: int = 1, kv_cache: str = "bf16", offload_options: dict | None = None,
         threads: int | None = None) -> DbrxRunner:
    """Load a float or quantized DBRX checkpoint with its tokenizer.

    Args:
        path_or_repo_id: a local folder, a hub repo id or a DBRX ``.gguf`` file; None or "demo" for the small model shipped
            with dbrxq (a local folder named "demo" wins).
        device: cpu, cuda, cuda:N or auto.
        dtype: float32, bfloat16, float16 or auto/None (the checkpoint's).
        backend: force a quantized-kernel backend (default: the fastest for the device).
        gpu_memory, cpu_memory: memory budgets ("20GiB", "512MiB", "1.5GB" or bytes); either one
            offloads the experts of a quantized checkpoint (dbrxq.runtime.offload). Float checkpoints refuse.
        context: the tokens (prompt + new) the KV cache is planned for when offloading
            (default min(max_seq_len, 4096)).
        batch_size: the prompts generated together that the offloading memory plan reserves KV
            cache for (like context; without offloading the cache is sized per request).
        kv_cache: "bf16" (the model's dtype) or "int8" (about half the bytes; dbrxq.model.kv_cache).
        offload_options: prefetch, cache_dir, drop_page_cache, timing (see enable_offloading).
        threads: CPU threads (default: torch's, the physical cores); set for the whole process.
    """
    set_threads(threads)
    src = resolve_model_name(path_or_repo_id)
    model = load_model(src, device=device, dtype=dtype, revision=revision, backend=backend,
                       gpu_memory=gpu_memory, cpu_memory=cpu_memory, context=context, batch_size=batch_size,
                       kv_cache=check_flavour(kv_cache), offload_options=offload_options)
    tokenizer = getattr(model, "tokenizer_from_file", None) or DbrxTokenizer.from_pretrained(model.source_dir)
    check_tokenizer_fits(tokenizer, model.config.vocab_size)
    return DbrxRunner(model=model, tokenizer=tokenizer, kv_cache=kv_cache)


def check_tokenizer_fits(tokenizer: DbrxTokenizer, vocab_size: int) -> None:
    """Refuse a tokenizer whose ids run past the model's embedding (they would index out of its
    rows deep inside torch, on the first prompt that uses one), once, at load."""
    if tokenizer.vocab_size > vocab_size:
        raise TokenizerError(
            f"{tokenizer.source}: token ids run to {tokenizer.vocab_size - 1}, but the model's vocab_size is "
            f"{vocab_size}: this tokenizer does not belong to this checkpoint"
        )
