"""The OpenAI request schemas (pydantic, built on first use: `dbrxq run` never imports the HTTP stack),
OpenAI-shaped errors and the request limits.
"""


from typing import Any, Literal


def request_models():
    """pydantic request models (imported lazily: `dbrxq run` never needs the HTTP stack)."""
    from pydantic import BaseModel, ConfigDict, Field

    class TextPart(BaseModel):
        type: Literal["text"]
        text: str

    class Message(BaseModel):
        model_config = ConfigDict(extra="ignore")
        role: Literal["system", "user", "assistant"]
        content: str | list[TextPart]

        def text(self) -> str:
            return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)

    class StreamOptions(BaseModel):
        include_usage: bool = False

    class Common(BaseModel):
        model_config = ConfigDict(extra="ignore")
        model: str | None = None
        max_tokens: int | None = Field(None, ge=1)
        temperature: float = Field(1.0, ge=0, le=100)
        top_p: float = Field(1.0, gt=0, le=1)
        seed: int | None = Field(None, ge=0, le=2**64 - 1)
        stop: str | list[str] | None = None
        n: int = 1
        stream: bool = False
        stream_options: StreamOptions | None = None
        logprobs: Any = None
        ignore_eos: bool = False  # vLLM's extension: generate max_tokens even past end-of-text
        presence_penalty: float = Field(0.0, ge=-2, le=2)
        frequency_penalty: float = Field(0.0, ge=-2, le=2)
        repetition_penalty: float = Field(1.0, gt=0, le=10)  # vLLM's extension (llama.cpp's repeat_penalty)
        # Fields the API defines that this server cannot honour: refused (400) unless they ask for nothing
        logit_bias: dict[str, float] | None = None
        tools: list[Any] | None = None
        functions: list[Any] | None = None
        tool_choice: Any = None
        response_format: dict[str, Any] | None = None
        best_of: int | None = None
        suffix: str | None = None

    class ChatRequest(Common):
        messages: list[Message] = Field(min_length=1)
        max_completion_tokens: int | None = Field(None, ge=1)

    class CompletionRequest(Common):
        prompt: str | list[str] | list[int] | list[list[int]]
        echo: bool = False

    return ChatRequest, CompletionRequest


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          405: "invalid_request_error", 408: "invalid_request_error", 413: "invalid_request_error", 503: "server_error"}


MAX_BODY = 4 << 20


MAX_STOP_CHARS = 256  # each stop sequence; matching costs O(its length) per generated token  # bytes of a request body; a whole context of text is far less
