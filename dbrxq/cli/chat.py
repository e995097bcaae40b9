"""``dbrxq run --chat``: one reply (with --prompt) or an interactive chat.

The interactive chat prints a one-line banner, then reads lines at ``>>>``. Lines that start with
``/`` are commands, as in Ollama's REPL: ``/bye`` (also ``exit``, ``quit``, Ctrl-D) leaves,
``/clear`` forgets the conversation, ``/set temperature T`` (and ``top_p``, ``top_k``, ``seed``,
``max_new_tokens``, ``repeat_penalty``, ``system TEXT``) change settings for the next replies,
``/show`` prints them, ``/help`` lists the commands. After each reply a line on stderr says how much
of the context the conversation uses; when the next turn would not fit, the oldest turns are dropped
(one notice).
"""

from __future__ import annotations

import dataclasses

import click

from dbrxq.core.errors import DbrxqError, GenerationError
from dbrxq.runtime.generate import check_sampling

LEAVE = ("/bye", "/exit", "/quit", "exit", "quit")
HELP = """commands:
  /bye (or exit, quit, Ctrl-D)   leave the chat
  /clear                         forget the conversation so far
  /set temperature T             also top_p P, top_k K, seed N, max_new_tokens N, repeat_penalty R
  /set system TEXT               replace the system prompt ('/set system' alone: none)
  /show                          the settings in force
  /help                          this list
Ctrl-C stops a reply; the conversation goes on."""
SETTINGS = {"temperature": float, "top_p": float, "top_k": int, "seed": int, "max_new_tokens": int,
            "repeat_penalty": float}


def fit_conversation(runner, messages: list[dict], system: str | None, max_new_tokens: int) -> None:
    """Drop the oldest turns (user + assistant pairs; the system prompt is not a turn) until the
    templated conversation plus max_new_tokens fits the model's context, with a one-line notice. A
    last message that alone does not fit raises GenerationError
    (run's one-line error)."""
    ctx = runner.model.config.max_seq_len
    dropped = 0

    def need() -> int:
        return len(runner.tokenizer.apply_chat_template(messages, system_prompt=system)) + max_new_tokens

    while need() > ctx and len(messages) > 1:
        del messages[:2 if len(messages) > 2 else 1]
        dropped += 1
    if need() > ctx:
        raise GenerationError(f"this message, the system prompt and --max-new-tokens {max_new_tokens} need "
                              f"{need()} tokens, beyond the model's context of {ctx}")
    if dropped:
        click.echo(f"[context full: dropped the {dropped} oldest turn(s); {ctx} tokens of context]", err=True)


def apply_setting(kw: dict, line: str) -> str | None:
    """``/set NAME VALUE`` into ``kw`` (run's generation keywords, with "system"); returns a line to
    print (an error or what was set)."""
    parts = line.split(None, 2)
    if len(parts) >= 2 and parts[1] == "system":
        kw["system"] = parts[2] if len(parts) > 2 else ""
        return "system prompt " + ("replaced" if kw["system"] else "removed")
    if len(parts) != 3 or parts[1] not in SETTINGS:
        return f"usage: /set {{{', '.join(SETTINGS)}}} VALUE, or /set system TEXT"
    name, text = parts[1], parts[2]
    try:
        value = SETTINGS[name](text)
    except ValueError:
        return f"/set {name}: {text!r} is not a {SETTINGS[name].__name__}"
    new = dict(kw)
    if name == "repeat_penalty":
        new["penalties"] = dataclasses.replace(kw["penalties"], repetition=value)
    else:
        new[name] = value
    try:
        check_sampling(new["temperature"], new["top_k"], new["top_p"], new["seed"])
        new["penalties"].check()
        if new["max_new_tokens"] < 1:
            raise GenerationError(f"max_new_tokens must be >= 1, got {new['max_new_tokens']}")
    except DbrxqError as e:
        return f"error: {e}"
    kw.update(new)
    return f"{name} = {value}"


def show(kw: dict) -> str:
    system = kw["system"]
    shown = {k: kw[k] for k in ("temperature", "top_p", "top_k", "seed", "max_new_tokens")}
    shown["repeat_penalty"] = kw["penalties"].repetition
    return (", ".join(f"{k} {v}" for k, v in shown.items()) + "; system prompt: "
            + ("DBRX-instruct's" if system is None else repr(system[:60]) if system else "none"))


def chat_loop(runner, prompt: str | None, system: str | None, kw: dict, emit, report) -> None:
    """One reply to ``prompt``, or (``prompt`` None) the interactive chat described in the module."""
    kw = {**kw, "system": system}
    messages: list[dict] = []
    interactive = prompt is None
    ctx = runner.model.config.max_seq_len
    if interactive:
        click.echo(f"dbrxq chat with {runner.model.config.n_layers}-layer DBRX ({ctx} tokens of context); "
                   f"/help for commands, /bye to leave", err=True)
    while True:
        if interactive:
            try:
                prompt = click.prompt(">>>", prompt_suffix=" ", default="", show_default=False)
            except (EOFError, click.Abort):  # Ctrl-D, or Ctrl-C at the prompt: the chat ends
                emit("\n")
                return
            line = prompt.strip()
            if not line:
                continue
            if line.lower() in LEAVE:
                return
            if line.startswith("/"):
                command = line.split()[0]
                if command == "/clear":
                    messages.clear()
                    click.echo("conversation cleared", err=True)
                elif command == "/set":
                    click.echo(apply_setting(kw, line), err=True)
                elif command == "/show":
                    click.echo(show(kw), err=True)
                elif command in ("/help", "/?"):
                    click.echo(HELP, err=True)
                else:
                    click.echo(f"unknown command {command}; /help lists them", err=True)
                continue
        gen = {k: v for k, v in kw.items() if k != "system"}
        messages.append({"role": "user", "content": prompt})
        try:
            fit_conversation(runner, messages, kw["system"], gen["max_new_tokens"])
        except DbrxqError as e:  # the new message alone does not fit
            messages.pop()
            if not interactive:
                raise
            click.echo(f"error: {e}", err=True)
            continue
        said: list[str] = []
        try:
            reply = runner.chat(messages, system_prompt=kw["system"], on_text=lambda t: (said.append(t), emit(t)),
                                **gen)
        except KeyboardInterrupt:  # Ctrl-C during a reply stops it; the conversation goes on
            reply = "".join(said)
            click.echo("\n[reply interrupted]", err=True)
        emit("\n")
        report()
        messages.append({"role": "assistant", "content": reply})
        if not interactive:
            return
        used = len(runner.tokenizer.apply_chat_template(messages, system_prompt=kw["system"]))
        click.echo(f"[context: {used} of {ctx} tokens used]", err=True)
