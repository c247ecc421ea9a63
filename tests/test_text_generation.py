"""text-generation over the wire: the same tokens as transformers' generate and pipeline, batched or not."""

from __future__ import annotations

import asyncio
import copy

import grpc
import pytest
import torch
from pipeserve.client import pipeline
from pipeserve.v1 import text_generation_pb2 as pb
from transformers import pipeline as hf_pipeline

from tests.generation_helpers import PROMPTS, Reference, params, statistics, stub
from tests.rpc_errors import expect_invalid_argument

MODEL = "gpt2"
N = 12


@pytest.fixture(scope="module")
def reference(model_repository) -> Reference:
    return Reference(model_repository / MODEL)


@pytest.fixture(scope="module")
def gen(target):
    with pipeline("text-generation", target=target) as remote:
        yield remote


async def _concurrently(target: str, requests: list) -> list:
    """Sends unary and streaming requests at once; returns token ids per request."""
    async with grpc.aio.insecure_channel(target) as channel:
        s = stub(channel)

        async def one(request):
            if isinstance(request, pb.GenerateRequest):
                response = await s.Generate(request)
                return [list(seq.token_ids) for r in response.results for seq in r.sequences]
            return [t async for message in s.GenerateStream(request) for t in message.token_ids]

        return await asyncio.gather(*(one(r) for r in requests))


def test_greedy_equals_generate_while_batched_with_prompts_of_other_lengths(target, reference):
    greedy = dict(do_sample=False)
    requests = [pb.GenerateRequest(inputs=PROMPTS, parameters=params(max_new_tokens=N, **greedy))]
    requests += [pb.GenerateStreamRequest(input=p, parameters=params(max_new_tokens=N + i, **greedy))
                 for i, p in enumerate(PROMPTS)]
    before = statistics(target, MODEL).batch_sizes
    unary, *streams = asyncio.run(_concurrently(target, requests))
    for prompt, tokens in zip(PROMPTS, unary):
        assert tokens == reference.generate(prompt, max_new_tokens=N, do_sample=False), prompt
    for i, (prompt, tokens) in enumerate(zip(PROMPTS, streams)):
        assert tokens == reference.generate(prompt, max_new_tokens=N + i, do_sample=False), prompt
    after = statistics(target, MODEL).batch_sizes
    # They really shared forward passes: decode steps of many rows ran.
    assert any(size >= len(PROMPTS) and count > before.get(size, 0) for size, count in after.items()), dict(after)


def test_sequences_joining_and_leaving_a_running_batch_keep_generates_tokens(target, reference):
    async def run():
        async with grpc.aio.insecure_channel(target) as channel:
            s = stub(channel)

            async def tokens(call):
                found = []
                while (message := await call.read()) is not grpc.aio.EOF:
                    found += message.token_ids
                return found

            def start(prompt, n):
                return s.GenerateStream(pb.GenerateStreamRequest(input=prompt, parameters=params(
                    max_new_tokens=n, do_sample=False)))

            first = start(PROMPTS[0], 30)
            head = list((await first.read()).token_ids)  # running: the others join its batch
            wave = [asyncio.ensure_future(tokens(start(p, n))) for p, n in zip(PROMPTS[1:], (4, 9, 14, 6))]
            middle = await wave[0]  # one leaves while the rest go on; then one more joins
            late = await tokens(start(PROMPTS[2], 7))
            return head + await tokens(first), [middle, *[await w for w in wave[1:]]], late

    first, wave, late = asyncio.run(run())
    assert first == reference.generate(PROMPTS[0], max_new_tokens=30, do_sample=False)
    for prompt, n, got in zip(PROMPTS[1:], (4, 9, 14, 6), wave):
        assert got == reference.generate(prompt, max_new_tokens=n, do_sample=False), prompt
    assert late == reference.generate(PROMPTS[2], max_new_tokens=7, do_sample=False)


def test_the_eager_backends_decoder_state_keeps_rows_apart(reference):
    """The backend contract the engine relies on, driven directly: rows prefilled together, one
    released from the middle (the last row moves into its place), one extended in, all decoding
    in one forward per step, each equal to generate's tokens for its prompt alone."""
    from pipeserve.backends.eager import EagerInstance

    # A copy: the instance sets the model's attention to its own, and `reference` must stay transformers' alone.
    instance = EagerInstance(copy.deepcopy(reference.model), torch.device("cpu"))
    prompts = [reference.ids(p) for p in PROMPTS]
    steps = 80  # past the buffers' first 64 positions, so that they grow while rows are held
    wanted = {i: reference.generate(PROMPTS[i], max_new_tokens=steps, do_sample=False) for i in range(len(PROMPTS))}
    logits, state = instance.prefill(prompts[:3])
    rows = [0, 1, 2]
    got = {i: [int(t)] for i, t in zip(rows, logits.argmax(-1))}
    for step in range(steps - 1):
        if step == 2:
            rows = [rows[i] for i in state.release([0])]
            got.pop(0)
        if step == 70:  # short prompts join rows longer than themselves, beyond the rows allocated
            logits, new = instance.prefill(prompts[3:])
            state.extend(new)
            rows += [3, 4]
            got.update({i: [int(t)] for i, t in zip((3, 4), logits.argmax(-1))})
        logits = instance.decode(state, torch.tensor([got[i][-1] for i in rows]))
        for i, t in zip(rows, logits.argmax(-1)):
            got[i].append(int(t))
    assert state.rows == 4
    for i in (1, 2):
        assert got[i] == wanted[i], PROMPTS[i]
    for i in (3, 4):
        assert got[i] == wanted[i][: len(got[i])], PROMPTS[i]


@pytest.mark.parametrize("cpu_matmul", ["torch", "numpy"])
def test_joint_steps_run_new_prompts_with_the_running_rows_and_keep_generates_tokens(reference, cpu_matmul):
    """The eager backend's joint step (one forward for the running rows and the prompts that join
    them), driven directly: prompts join an empty batch, then a running one, several at once, and
    rows leave between steps; each sequence's tokens equal generate's for its prompt alone. With
    linear layers on numpy's BLAS too (only the rounding of the products differs)."""
    from pipeserve.backends.eager import EagerInstance

    instance = EagerInstance(copy.deepcopy(reference.model), torch.device("cpu"), cpu_matmul)
    instance.warm_up()
    assert instance.supports_joint_steps
    prompts = [reference.ids(p) for p in PROMPTS]
    wanted = [reference.generate(p, max_new_tokens=N, do_sample=False) for p in PROMPTS]
    arrivals = {0: [1], 2: [0, 2], 5: [3], 6: [4]}  # step -> prompts that join at it
    state, rows, got = None, [], {i: [] for i in range(len(PROMPTS))}
    for step in range(40):
        done = [r for r, i in enumerate(rows) if len(got[i]) == N]
        if done:
            rows = [rows[r] for r in state.release(done)]
        joining = arrivals.get(step, [])
        if not rows and not joining and step > max(arrivals):
            break
        tokens = torch.tensor([got[i][-1] for i in rows], dtype=torch.long)
        logits, state = instance.step(state, tokens, [prompts[i] for i in joining])
        assert logits.shape == (len(rows) + len(joining), reference.model.config.vocab_size)
        rows += joining
        for i, t in zip(rows, logits.argmax(-1)):
            got[i].append(int(t))
    assert state.rows == 0
    for i, prompt in enumerate(PROMPTS):
        assert got[i] == wanted[i], prompt


def _tiny_causal_lm(kind: str) -> torch.nn.Module:
    """A random decoder of another family, built from its config: rotary positions and grouped
    key/value heads (llama), rotary over part of each head (gpt_neox), learned positions with an
    offset (opt)."""
    import transformers

    shape = dict(vocab_size=211, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=256, eos_token_id=None)
    config = {
        "llama": lambda: transformers.LlamaConfig(**shape, intermediate_size=128, num_key_value_heads=2),
        "gpt_neox": lambda: transformers.GPTNeoXConfig(**shape, intermediate_size=128, rotary_pct=0.5),
        "opt": lambda: transformers.OPTConfig(**shape, ffn_dim=128, word_embed_proj_dim=64),
    }[kind]()
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("kind", ["llama", "gpt_neox", "opt"])
def test_joint_steps_keep_generates_tokens_for_other_model_families(kind):
    from pipeserve.backends.eager import EagerInstance

    model = _tiny_causal_lm(kind)
    prompts = [[(7 * i + 3 * n) % 200 + 5 for i in range(n)] for n in (10, 3, 17)]
    wanted = []
    with torch.inference_mode():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=N, do_sample=False,
                                 pad_token_id=0)
            wanted.append(out[0, len(prompt):].tolist())
    instance = EagerInstance(model, torch.device("cpu"))
    assert instance.supports_joint_steps
    logits, state = instance.step(None, torch.zeros(0, dtype=torch.long), prompts[:1])
    got = [[int(logits[0].argmax())], [], []]
    logits, state = instance.step(state, torch.tensor([got[0][-1]]), prompts[1:])  # two join a running row
    for i, row in enumerate(logits.argmax(-1).tolist()):
        got[i].append(row)
    while any(len(g) < N for g in got):
        logits, state = instance.step(state, torch.tensor([g[-1] for g in got]), [])
        for i, row in enumerate(logits.argmax(-1).tolist()):
            got[i].append(row)
    assert [g[: len(w)] for g, w in zip(got, wanted)] == wanted


def test_a_model_whose_code_does_not_fit_step_wise_decoding_says_why_before_any_request():
    """Bloom's attention (ALiBi, its own code) does not take the row cache: the instance finds out
    by decoding a token when it is asked, so that the model fails to load with the reason."""
    import transformers

    from pipeserve.backends.eager import EagerInstance

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        transformers.BloomConfig(vocab_size=211, hidden_size=64, n_layer=2, n_head=4)).eval()
    instance = EagerInstance(model, torch.device("cpu"))
    assert not instance.supports_decoding
    assert "step-wise decoding does not work with BloomForCausalLM" in instance.decoding_unsupported


def test_matches_transformers_pipeline(gen, model_repository):
    theirs = hf_pipeline("text-generation", model=str(model_repository / MODEL))
    for inputs, kwargs in [
        ("Hello world", {}),  # the model's generation config: greedy, 32 new tokens
        (PROMPTS, {"max_new_tokens": 6}),
        ("The cat", {"return_full_text": False, "max_new_tokens": 8}),
        ("Hello", {"repetition_penalty": 1.5, "max_new_tokens": 10}),
    ]:
        assert gen(inputs, **kwargs) == theirs(inputs, **kwargs), (inputs, kwargs)
    # Sampling: our seed gives what transformers gives after torch.manual_seed, with its defaults
    # (temperature 0.7 and top_k 50 when the model sets none) or with the parameters named.
    for kwargs in [{"do_sample": True}, {"do_sample": True, "temperature": 1.3, "top_k": 0, "top_p": 0.9}]:
        torch.manual_seed(5)
        expected = theirs(PROMPTS[1], max_new_tokens=10, **kwargs)
        assert gen(PROMPTS[1], max_new_tokens=10, seed=5, **kwargs) == expected, kwargs


def test_a_seeded_stream_is_reproducible_whatever_shares_the_batch(target, reference):
    sampled = dict(do_sample=True, temperature=1.0, top_k=0, max_new_tokens=16)
    seeded = pb.GenerateStreamRequest(input=PROMPTS[2], parameters=params(seed=11, **sampled))
    (alone,) = asyncio.run(_concurrently(target, [seeded]))
    neighbours = [pb.GenerateStreamRequest(input=p, parameters=params(**sampled)) for p in PROMPTS]
    neighbours += [pb.GenerateRequest(inputs=PROMPTS[:3], parameters=params(do_sample=False, max_new_tokens=20))]
    together = asyncio.run(_concurrently(target, [*neighbours[:3], seeded, *neighbours[3:]]))[3]
    assert together == alone
    assert alone == reference.generate(PROMPTS[2], seed=11, **sampled)


def test_num_return_sequences_and_the_shapes_of_results(gen):
    several = gen("Hello", do_sample=True, seed=1, num_return_sequences=3, max_new_tokens=5)
    assert len(several) == 3 and all(set(r) == {"generated_text"} and r["generated_text"].startswith("Hello")
                                     for r in several)
    assert gen("Hello", do_sample=True, seed=1, num_return_sequences=3, max_new_tokens=5) == several
    batch = gen(["a", "b c"], max_new_tokens=3, do_sample=False)
    assert [len(per_input) for per_input in batch] == [1, 1]


def test_stop_sequences_end_the_text_and_the_finish_reason_says_why(target, reference):
    with grpc.insecure_channel(target) as channel:
        s = stub(channel)
        full = s.Generate(pb.GenerateRequest(inputs=[PROMPTS[1]], parameters=params(do_sample=False, max_new_tokens=20),
                                             return_full_text=False)).results[0].sequences[0]
        assert full.finish_reason == pb.FINISH_REASON_LENGTH
        assert full.usage.generated_tokens == 20 and full.usage.prompt_tokens == len(reference.ids(PROMPTS[1]))
        text = full.generated_text
        stop = text[len(text) // 2 : len(text) // 2 + 3]
        stopped = s.Generate(pb.GenerateRequest(
            inputs=[PROMPTS[1]], parameters=params(do_sample=False, max_new_tokens=20, stop_sequences=["zzzz", stop]),
            return_full_text=False)).results[0].sequences[0]
    assert stopped.generated_text == text[: text.find(stop) + len(stop)]
    assert stopped.finish_reason == pb.FINISH_REASON_STOP_SEQUENCE
    assert list(stopped.token_ids) == list(full.token_ids)[: len(stopped.token_ids)]


def test_logprobs_are_the_models_log_probabilities(target, reference):
    with grpc.insecure_channel(target) as channel:
        result = stub(channel).Generate(pb.GenerateRequest(
            inputs=[PROMPTS[0]], parameters=params(do_sample=False, max_new_tokens=4, logprobs=True, top_logprobs=3),
        )).results[0].sequences[0]
    ids = torch.tensor([reference.ids(PROMPTS[0])])
    with torch.inference_mode():
        out = reference.model.generate(ids, max_new_tokens=4, do_sample=False, output_logits=True,
                                       return_dict_in_generate=True)
    assert len(result.logprobs) == 4
    for lp, token, logits in zip(result.logprobs, result.token_ids, out.logits):
        expected = torch.log_softmax(logits[0].float(), dim=-1)
        assert lp.token_id == token and lp.logprob == pytest.approx(float(expected[token]), abs=1e-4)
        assert [t.token_id for t in lp.top] == expected.topk(3).indices.tolist()
        assert lp.top[0].token_id == token  # greedy picks the likeliest
        assert lp.top[0].token == reference.tokenizer.decode([token])


@pytest.mark.parametrize("fields, field", [
    (dict(parameters=params(max_new_tokens=0)), "max_new_tokens"),
    (dict(parameters=params(max_new_tokens=100_000)), "max_new_tokens"),
    (dict(parameters=params(do_sample=True, temperature=0.0)), "temperature"),
    (dict(parameters=params(top_p=1.5)), "top_p"),
    (dict(parameters=params(top_k=-1)), "top_k"),
    (dict(parameters=params(repetition_penalty=0.0)), "repetition_penalty"),
    (dict(parameters=params(logprobs=True, top_logprobs=50)), "top_logprobs"),
    (dict(parameters=params(stop_sequences=[""])), "stop_sequences[0]"),
    (dict(parameters=params(do_sample=False), num_return_sequences=2), "num_return_sequences"),
    (dict(inputs=["fine", "word " * 2000]), "inputs[1]"),
    (dict(inputs=[]), "inputs"),
])
def test_bad_parameters_are_invalid_argument_naming_the_field(target, fields, field):
    fields.setdefault("inputs", ["Hello"])
    with grpc.insecure_channel(target) as channel:
        expect_invalid_argument(lambda: stub(channel).Generate(pb.GenerateRequest(**fields)), field)


def test_a_bad_stream_request_is_invalid_argument_before_any_token(target):
    with grpc.insecure_channel(target) as channel:
        s = stub(channel)
        expect_invalid_argument(lambda: list(s.GenerateStream(pb.GenerateStreamRequest(
            input="Hello", parameters=params(top_p=0.0)))), "top_p")
        expect_invalid_argument(lambda: list(s.GenerateStream(pb.GenerateStreamRequest(input="word " * 2000))), "input")


def test_beam_search_runs_whole_sequences_beside_the_engines_streams(target, reference, model_repository):
    """A beam-search request takes the whole-sequence path (generate() on the instance's worker
    thread, through the batcher) while streams run on the engine: each gets generate's tokens."""
    beams = pb.GenerateRequest(inputs=PROMPTS[:2], parameters=params(max_new_tokens=8, num_beams=3),
                               num_return_sequences=2)
    streams = [pb.GenerateStreamRequest(input=p, parameters=params(max_new_tokens=N, do_sample=False))
               for p in PROMPTS]
    before = statistics(target, MODEL).success_count
    beam_tokens, *stream_tokens = asyncio.run(_concurrently(target, [beams, *streams]))
    for prompt, tokens in zip(PROMPTS, stream_tokens):
        assert tokens == reference.generate(prompt, max_new_tokens=N, do_sample=False), prompt
    theirs = hf_pipeline("text-generation", model=str(model_repository / MODEL))
    expected = [theirs(p, max_new_tokens=8, num_beams=3, num_return_sequences=2, return_tensors=True)
                for p in PROMPTS[:2]]
    ids = [reference.ids(p) for p in PROMPTS[:2]]
    wanted = [r["generated_token_ids"][len(i):] for i, per_prompt in zip(ids, expected) for r in per_prompt]
    # The server reports a sequence's tokens up to its end-of-sequence token; generate pads after it.
    assert [t for t in beam_tokens] == [[w for w in want][: len(t)] for t, want in zip(beam_tokens, wanted)]
    assert statistics(target, MODEL).success_count >= before + 1 + len(PROMPTS)
