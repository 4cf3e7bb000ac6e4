"""The gateway through the official OpenAI Python SDK, as an application would use it: only
`base_url` and `api_key` change. Run by the integration test
`the_openai_sdk_gets_hits_from_the_gateway` against the real binary and a fake upstream;
exits non-zero on the first failed check. Usage: gateway_openai.py BASE_URL API_KEY
"""

import sys
import time
import uuid

import openai
from openai import OpenAI

base_url, api_key = sys.argv[1], sys.argv[2]
client = OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=30)
run = uuid.uuid4().hex[:8]
MODEL = "gpt-4o-mini"


def check(cond, what):
    if not cond:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)
    print(f"ok: {what}")


def create(prompt, extra_headers=None, **kw):
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=[{"role": "user", "content": prompt}],
        extra_headers=extra_headers or {},
        **kw,
    )
    return raw.headers, raw.parse()


def stream(prompt, include_usage=False, **kw):
    options = {"include_usage": True} if include_usage else None
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=[{"role": "user", "content": prompt}],
        stream=True,
        stream_options=options,
        **kw,
    )
    text, usage, finish, ids = "", None, None, set()
    for chunk in raw.parse():
        ids.add(chunk.id)
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            if c.delta.content:
                text += c.delta.content
            if c.finish_reason:
                finish = c.finish_reason
    return raw.headers, text, usage, finish, ids


def stored(prompt, **kw):
    """Wait until a miss's answer is stored: it is stored after the client has it, and until
    then an identical request is answered from the call itself (path `coalesced`)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            h, _ = create(prompt, extra_headers={"X-Semantis-Cache-Only": "true"}, **kw)
            if h["x-semantis-cache-path"] == "exact":
                return
        except openai.APIStatusError as e:
            if e.status_code != 504:
                raise
        time.sleep(0.05)
    check(False, f"the answer to {prompt!r} was stored within 10 s")


# Miss, then hit, not streaming.
q = f"What is the boiling point of water at sea level? ({run})"
h1, r1 = create(q)
h2, r2 = create(q)
check(h1["x-semantis-cache"] == "MISS", "the first call is a miss")
check(h2["x-semantis-cache"] == "HIT", "the second call is a hit")
check(h2["x-semantis-cache-path"] in ("exact", "coalesced"),
      "an identical prompt hits on the exact path (or on the first call while it is stored)")
check(r2.choices[0].message.content == r1.choices[0].message.content, "the hit is the stored answer")
check(r2.id != r1.id and r2.id.startswith("chatcmpl-"), "a hit has a fresh id")
check(r2.usage.completion_tokens == r1.usage.completion_tokens, "a hit carries the stored usage")

# Miss, then hit, streaming, with the usage chunk.
q = f"Write a haiku about the sea ({run})"
h1, t1, u1, f1, _ = stream(q, include_usage=True)
h2, t2, u2, f2, ids = stream(q, include_usage=True)
check(h1["x-semantis-cache"] == "MISS" and h2["x-semantis-cache"] == "HIT", "stream: miss then hit")
check(t1 and t2 == t1, "stream: the replayed text is the streamed text")
check(f1 == "stop" and f2 == "stop", "stream: both end with finish_reason stop")
check(u1 is not None and u2 is not None and u2.total_tokens == u1.total_tokens,
      "stream: include_usage gives a usage chunk on the miss and the hit")
check(len(ids) == 1, "stream: every replayed chunk carries one id")
# A streamed answer serves a later non-streaming request, and the other way round.
h3, r3 = create(q)
check(h3["x-semantis-cache"] == "HIT" and r3.choices[0].message.content == t1,
      "a streamed answer serves a non-streaming request")

# A paraphrase hits on the semantic path.
h1, r1 = create(f"What is the capital of France? ({run})")
stored(f"What is the capital of France? ({run})")
h2, r2 = create(f"What's the capital of France? ({run})")
check(h1["x-semantis-cache"] == "MISS", "paraphrase: the first is a miss")
check(h2["x-semantis-cache"] == "HIT" and h2["x-semantis-cache-path"] == "semantic",
      f"paraphrase: the second is a semantic hit ({h2.get('x-semantis-cache')})")
check(float(h2["x-semantis-similarity"]) < 1.0, "paraphrase: its similarity is below 1")
check(r2.choices[0].message.content == r1.choices[0].message.content, "paraphrase: the stored answer")

# A tool-call request is scoped apart from the same prompt without tools.
tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
q = f"What is the weather in Paris? ({run})"
hp, rp = create(q)
ht, rt = create(q, tools=tools)
ht2, rt2 = create(q, tools=tools)
check(hp["x-semantis-cache"] == "MISS" and ht["x-semantis-cache"] == "MISS",
      "tools: the same prompt with tools is a different scope")
check(rt.choices[0].message.tool_calls[0].function.name == "get_weather", "tools: the upstream's tool call")
check(ht2["x-semantis-cache"] == "HIT", "tools: the tool-call answer is cached")
check(rt2.choices[0].message.tool_calls[0].function.arguments == rt.choices[0].message.tool_calls[0].function.arguments
      and rt2.choices[0].finish_reason == "tool_calls", "tools: the hit replays the tool call")
h, _, _, f, _ = stream(q, tools=tools)
check(h["x-semantis-cache"] == "HIT" and f == "tool_calls", "tools: a streamed hit ends in tool_calls")

# Requests that must not be cached go through as BYPASS.
h1, _ = create(f"Tell me a joke ({run})", temperature=1.8)
h2, _ = create(f"Tell me a joke ({run})", temperature=1.8)
check(h1["x-semantis-cache"] == "BYPASS" and h2["x-semantis-cache"] == "BYPASS",
      "temperature above the ceiling bypasses")
check(h1["x-semantis-bypass-reason"] == "temperature_above_ceiling", "the bypass says why")
h, r = create(f"Two names for a cat ({run})", n=2)
check(h["x-semantis-cache"] == "BYPASS" and h["x-semantis-bypass-reason"] == "n_greater_than_1", "n > 1 bypasses")

# Cache controls.
q = f"Never asked before ({run})"
try:
    create(q, extra_headers={"X-Semantis-Cache-Only": "true"})
    check(False, "cache-only on a miss must fail")
except openai.APIStatusError as e:
    check(e.status_code == 504 and e.body["code"] == "cache_miss", "cache-only on a miss is 504 cache_miss")
q = f"Do not keep this ({run})"
h1, _ = create(q, extra_headers={"X-Semantis-No-Store": "true"})
h2, _ = create(q)
check(h1["x-semantis-cache"] == "MISS" and h2["x-semantis-cache"] == "MISS", "no-store stores nothing")
h3, r3 = create(q, extra_headers={"X-Semantis-No-Lookup": "true"})
check(h3["x-semantis-cache"] == "MISS", "no-lookup calls the upstream though the answer is cached")
stored(q)
h4, r4 = create(q)
check(h4["x-semantis-cache"] == "HIT", "the answer is cached")
h5, _ = create(q, extra_headers={"X-Semantis-Namespace": "other-app"})
check(h5["x-semantis-cache"] == "MISS", "another namespace does not see it")
h6, _ = create(q, extra_headers={"X-Semantis-Cache-Bypass": "true"})
check(h6["x-semantis-cache"] == "BYPASS" and h6["x-semantis-bypass-reason"] == "client_request",
      "the client can ask for a bypass")
try:
    create(q, extra_headers={"X-Semantis-TTL": "soon"})
    check(False, "a bad TTL must fail")
except openai.BadRequestError:
    check(False, "a bad TTL is 422, not 400")
except openai.UnprocessableEntityError as e:
    check(e.body["code"] == "invalid_ttl", "a bad TTL header is 422 invalid_ttl")

# Upstream failures come back as OpenAI-shaped errors.
try:
    create(f"[500] please fail ({run})")
    check(False, "an upstream 500 must fail")
except openai.APIStatusError as e:
    check(e.status_code == 502 and e.body["code"] == "upstream_error"
          and "overloaded" in e.body["message"], "an upstream 500 is 502 upstream_error quoting it")
try:
    create(f"[hang] never answers ({run})")
    check(False, "a hanging upstream must fail")
except openai.APIStatusError as e:
    check(e.status_code == 504 and e.body["code"] == "upstream_timeout", "a hanging upstream is 504 upstream_timeout")

# A stream cut off mid-way reaches the client broken, and is not stored.
q = f"[cut] a long story ({run})"
try:
    stream(q)
    check(False, "a cut stream must raise")
except openai.APIStatusError as e:
    check(False, f"a cut stream fails mid-way, not with a status ({e.status_code})")
except Exception as e:  # httpx's RemoteProtocolError: the body ended before its end
    check(True, f"a cut stream raises mid-way ({type(e).__name__})")
try:
    create(q, extra_headers={"X-Semantis-Cache-Only": "true"})
    check(False, "a cut stream must not be stored")
except openai.APIStatusError as e:
    check(e.status_code == 504 and e.body["code"] == "cache_miss", "a cut stream is not stored")

# A stream whose client did not ask for usage gets none (the gateway asks upstream for it).
h, t, u, f, _ = stream(f"Name three rivers ({run})")
check(h["x-semantis-cache"] == "MISS" and t and u is None, "stream: no usage chunk unless asked for")

# Over a user's requests per minute (3 for this tenant's users): 429 with Retry-After.
allowed = 0
for i in range(8):
    try:
        client.chat.completions.create(
            model=MODEL, user=f"alice-{run}",
            messages=[{"role": "user", "content": f"Question number {i} from alice ({run})"}])
        allowed += 1
    except openai.RateLimitError as e:
        check(e.body["code"] == "rate_limited", "limits: the error says rate_limited")
        retry = int(e.response.headers["retry-after"])
        check(1 <= retry <= 60, f"limits: Retry-After is within the minute ({retry})")
        check(e.response.headers["x-ratelimit-limit"] == "3"
              and e.response.headers["x-ratelimit-remaining"] == "0", "limits: X-RateLimit-* say why")
        break
check(3 <= allowed <= 6, f"limits: 3 requests a minute went through before the 429 ({allowed})")
h, _ = create(f"A question from bob ({run})", user=f"bob-{run}")
check(h["x-ratelimit-limit"] == "3" and h["x-ratelimit-remaining"] == "2",
      "limits: another user has a window of their own")
h, _ = create(f"Question number 0 from alice ({run})", user=f"alice-{run}")
check(h["x-semantis-cache"] == "HIT", "limits: a user over the limit is still answered from the cache")

# Pass-throughs.
ids = [m.id for m in client.models.list()]
check(ids == ["fake-small", "fake-large"], "models: the upstream's list")
e1 = client.embeddings.with_raw_response.create(model="text-embedding-3-small", input=["a", f"b {run}"])
e2 = client.embeddings.with_raw_response.create(model="text-embedding-3-small", input=["a", f"b {run}"])
check(e1.headers["x-semantis-cache"] == "MISS" and e2.headers["x-semantis-cache"] == "HIT",
      "embeddings: the second call is answered from the embedding cache")
check([d.embedding for d in e1.parse().data] == [d.embedding for d in e2.parse().data],
      "embeddings: the same vectors")

# A wrong key is the SDK's AuthenticationError.
try:
    OpenAI(base_url=base_url, api_key="wrong", max_retries=0).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}])
    check(False, "a wrong key must fail")
except openai.AuthenticationError as e:
    check(e.body["code"] == "invalid_api_key", "a wrong key is 401 invalid_api_key")
print("all checks passed")
