"""question-answering over the wire, checked against a brute-force reference of 4.x's semantics.

transformers 5 has no question-answering pipeline, so the reference here recomputes what the
4.x pipeline defined, straight from the model's logits: the context is cut into windows of
max_seq_len tokens that overlap by doc_stride, each window's start/end logits are softmaxed over
its context tokens and [CLS], every span of at most max_answer_len tokens is scored
p_start x p_end, each window's best top_k * 2 + 10 spans are widened to whole words, equal
answers add up their scores, and "no answer" scores the smallest [CLS] x [CLS] over the windows.
"""

from __future__ import annotations

import concurrent.futures
import random

import grpc
import numpy as np
import pytest
import torch
from transformers import AutoModelForQuestionAnswering, AutoTokenizer

from pipeserve.client import pipeline
from pipeserve.v1 import question_answering_pb2 as pb
from pipeserve.v1 import question_answering_pb2_grpc as pb_grpc
from tests.rpc_errors import expect_invalid_argument

WORDS = ("the a server model city river Berlin Paris answered quickly slowly engineer tokenizer window "
         "boundary blue green unbelievably café 2024 , .").split()


class BruteForce:
    """Answers by enumerating every span of every window, one window at a time, no padding."""

    def __init__(self, folder):
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModelForQuestionAnswering.from_pretrained(folder).eval()

    @staticmethod
    def windows(n_question: int, n_context: int, max_seq_len: int, doc_stride: int) -> list[tuple[int, int]]:
        """[start, end) context-token ranges; each window starts doc_stride tokens before the last one ended."""
        room = max_seq_len - n_question - 3  # [CLS] question [SEP] context [SEP]
        start, ranges = 0, []
        while True:
            end = min(start + room, n_context)
            ranges.append((start, end))
            if end == n_context:
                return ranges
            start = end - doc_stride

    def __call__(self, question, context, *, max_seq_len=384, doc_stride=128, max_answer_len=15, top_k=1,
                 handle_impossible_answer=False):
        tok = self.tokenizer
        q_ids = tok(question, add_special_tokens=False)["input_ids"]
        encoded = tok(context, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        ids, offsets, word_of = encoded["input_ids"], encoded["offset_mapping"], encoded.word_ids()
        word_chars: dict[int, tuple[int, int]] = {}
        for (begin, end), word in zip(offsets, word_of):
            lo, hi = word_chars.get(word, (begin, end))
            word_chars[word] = (min(lo, begin), max(hi, end))
        answers, null = [], 1e6
        for a, b in self.windows(len(q_ids), len(ids), max_seq_len, doc_stride):
            input_ids = [tok.cls_token_id, *q_ids, tok.sep_token_id, *ids[a:b], tok.sep_token_id]
            types = [0] * (len(q_ids) + 2) + [1] * (b - a + 1)
            with torch.no_grad():
                out = self.model(input_ids=torch.tensor([input_ids]), token_type_ids=torch.tensor([types]))
            first = len(q_ids) + 2
            scored = [0, *range(first, first + b - a)]  # [CLS] and the context

            def probabilities(logits):
                x = logits[0].numpy()[scored].astype(np.float32)
                e = np.exp(x - x.max())
                return dict(zip(scored, e / e.sum()))

            p_start, p_end = probabilities(out.start_logits), probabilities(out.end_logits)
            null = min(null, float(p_start[0] * p_end[0]))
            spans = sorted(((float(p_start[s] * p_end[e]), s, e) for s in scored[1:] for e in scored[1:]
                            if s <= e < s + max_answer_len), key=lambda c: -c[0])
            for score, s, e in spans[: top_k * 2 + 10]:
                first_token, last_token = a + s - first, a + e - first
                begin, end = word_chars[word_of[first_token]][0], word_chars[word_of[last_token]][1]
                text = context[begin:end]
                same = next((x for x in answers if x["answer"].lower() == text.lower()), None)
                if same is not None:
                    same["score"] += score
                else:
                    answers.append({"score": score, "start": begin, "end": end, "answer": text,
                                    "tokens": (first_token, last_token)})
        if handle_impossible_answer:
            answers.append({"score": null, "start": 0, "end": 0, "answer": ""})
        answers.sort(key=lambda x: -x["score"])
        return answers[:top_k]


def assert_same_answers(ours, expected):
    ours = ours if isinstance(ours, list) else [ours]
    assert len(ours) == len(expected), (ours, expected)
    for got, want in zip(ours, expected):
        assert set(got) == {"score", "start", "end", "answer"}
        assert (got["answer"], got["start"], got["end"]) == (want["answer"], want["start"], want["end"]), (got, want)
        assert got["score"] == pytest.approx(want["score"], rel=1e-4, abs=1e-7)


def random_text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


@pytest.fixture(scope="module")
def brute(model_repository):
    return BruteForce(str(model_repository / "qa"))


@pytest.fixture(scope="module")
def qa(target):
    with pipeline("question-answering", target=target) as remote:
        yield remote


def test_answer_crossing_a_window_boundary_is_found_with_offsets_into_the_context(qa, brute):
    params = {"max_seq_len": 32, "doc_stride": 6}
    rng = random.Random(7)
    for _ in range(100):
        question, context = random_text(rng, 3) + "?", random_text(rng, 60)
        best = brute(question, context, **params)[0]
        n_question = len(brute.tokenizer(question, add_special_tokens=False)["input_ids"])
        n_context = len(brute.tokenizer(context, add_special_tokens=False)["input_ids"])
        windows = brute.windows(n_question, n_context, params["max_seq_len"], params["doc_stride"])
        first, last = best["tokens"]
        # It starts in a window that ends before it does: only a later, overlapping window holds it.
        if any(a <= first < b <= last for a, b in windows):
            break
    else:
        pytest.fail("no context whose best answer crosses a window boundary")
    assert len(windows) > 2
    result = qa(question=question, context=context, **params)
    assert_same_answers(result, [best])
    assert context[result["start"] : result["end"]] == result["answer"]


@pytest.mark.parametrize("seed", range(4))
def test_random_contexts_and_parameters_match_the_reference(qa, brute, seed):
    rng = random.Random(seed)
    question, context = random_text(rng, rng.randint(1, 6)) + "?", random_text(rng, rng.randint(5, 120))
    params = {"max_seq_len": rng.choice([24, 32, 64]), "doc_stride": rng.choice([2, 4, 8]),
              "max_answer_len": rng.choice([1, 3, 15]), "top_k": rng.choice([1, 3]),
              "handle_impossible_answer": seed % 2 == 0}
    assert_same_answers(qa(question=question, context=context, **params), brute(question, context, **params))


def test_defaults_on_a_long_context(qa, brute):
    rng = random.Random(11)
    question, context = "Where does the engineer live?", random_text(rng, 700)
    assert len(brute.tokenizer(context, verbose=False)["input_ids"]) > 2 * 384  # several windows at max_seq_len 384, stride 128
    assert_same_answers(qa(question=question, context=context), brute(question, context))


def test_impossible_answer(qa, brute):
    # Nothing in the context to answer with: "no answer" is all that is left.
    assert qa(question="Who?", context="   ", handle_impossible_answer=True) == {"score": 1.0, "start": 0, "end": 0, "answer": ""}
    assert qa(question="Who?", context="   ") == []
    # A real context: "no answer" competes at its rank with the smallest [CLS] score over the windows.
    for context in ("Bob.", "the the", "Bob lives in Berlin. " * 12):
        params = {"handle_impossible_answer": True, "top_k": 500, "max_seq_len": 32, "doc_stride": 8}
        expected = brute("Who?", context, **params)
        nulls = [a for a in expected if a["answer"] == ""]
        assert len(nulls) == 1 and (nulls[0]["start"], nulls[0]["end"]) == (0, 0) and nulls[0] is not expected[0]
        assert_same_answers(qa(question="Who?", context=context, **params), expected)


def test_top_k_and_the_question_cut_to_max_question_len(qa, brute):
    rng = random.Random(5)
    context = random_text(rng, 60)
    assert_same_answers(qa(question="Who?", context=context, top_k=4), brute("Who?", context, top_k=4))
    question = "which engineer answered the tokenizer quickly in Berlin?"
    encoded = brute.tokenizer(question, add_special_tokens=False, return_offsets_mapping=True)
    cut = question[: encoded["offset_mapping"][3][1]]  # the first 4 tokens
    assert_same_answers(qa(question=question, context=context, max_question_len=4, max_seq_len=24, doc_stride=4),
                        brute(cut, context, max_seq_len=24, doc_stride=4))


def test_call_shapes_like_transformers(qa):
    pairs = [{"question": "Who lives in Berlin?", "context": "Wolfgang lives in Berlin."},
             {"question": "Where is Paris?", "context": "Paris is in France, on the Seine."}]
    one = [qa(question=p["question"], context=p["context"]) for p in pairs]
    assert all(set(r) == {"score", "start", "end", "answer"} for r in one)
    assert_same_answers(qa(pairs[0]), [one[0]])
    assert_same_answers(qa([pairs[0]]), [one[0]])
    assert_same_answers(qa(pairs[0]["question"], pairs[0]["context"]), [one[0]])
    assert_same_answers_lists(qa(pairs), one)
    assert_same_answers_lists(qa(question=[p["question"] for p in pairs], context=[p["context"] for p in pairs]), one)
    assert_same_answers_lists(qa(question=["Who?", "Where?"], context=pairs[0]["context"]),
                              [qa(question=q, context=pairs[0]["context"]) for q in ("Who?", "Where?")])
    several = qa(pairs[0], top_k=3)
    assert isinstance(several, list) and 1 < len(several) <= 3


def test_concurrent_requests_batch_without_changing_results(qa):
    rng = random.Random(9)
    cases = [(random_text(rng, 3) + "?", random_text(rng, rng.randint(3, 150))) for _ in range(6)]
    params = {"max_seq_len": 48, "doc_stride": 8, "top_k": 2}
    alone = [qa(question=q, context=c, **params) for q, c in cases]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda i: qa(question=cases[i % 6][0], context=cases[i % 6][1], **params), range(24)))
    for i, result in enumerate(together):
        assert_same_answers(result, [dict(a) for a in alone[i % 6]])
    # One request with all pairs: the windows of different inputs share forward passes.
    assert_same_answers_lists(qa([{"question": q, "context": c} for q, c in cases], **params), alone)


def assert_same_answers_lists(ours, expected):
    assert len(ours) == len(expected)
    for got, want in zip(ours, expected):
        assert_same_answers(got, want if isinstance(want, list) else [want])


async def test_asyncio_client_takes_the_same_call_shapes(target, qa):
    from pipeserve.client import aio

    async with aio.pipeline("question-answering", target=target) as remote:
        result = await remote(question="Who is here?", context="Bob is here.", top_k=2)
    assert_same_answers(result, qa(question="Who is here?", context="Bob is here.", top_k=2))


def test_empty_inputs_and_bad_parameters_are_invalid_argument(target):
    long_context = " ".join(["word"] * 200)
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.QuestionAnsweringServiceStub(channel)

        def answer(inputs=(("Who?", "Bob is here."),), **params):
            pairs = [pb.QuestionContext(question=q, context=c) for q, c in inputs]
            return lambda: stub.Answer(pb.AnswerRequest(inputs=pairs, **params))

        expect_invalid_argument(answer(inputs=[("Who?", "Bob."), ("Who?", "")]), "inputs[1].context")
        expect_invalid_argument(answer(inputs=[("", "Bob.")]), "inputs[0].question")
        expect_invalid_argument(answer(inputs=[]), "inputs")
        expect_invalid_argument(answer(top_k=0), "top_k")
        expect_invalid_argument(answer(max_answer_len=0), "max_answer_len")
        expect_invalid_argument(answer(max_seq_len=1000), "max_seq_len")
        expect_invalid_argument(answer(max_seq_len=64, doc_stride=65), "doc_stride")
        expect_invalid_argument(answer(max_question_len=0), "max_question_len")
        # 20 context tokens fit per window; a stride of 20 could never move forward.
        expect_invalid_argument(answer(inputs=[("Who?", long_context)], max_seq_len=25, doc_stride=20), "doc_stride")
        # A 30-token question leaves no room for the context in 24 tokens.
        expect_invalid_argument(answer(inputs=[(" ".join(["who"] * 30), "Bob.")], max_seq_len=24), "max_seq_len")
        response = stub.Answer(pb.AnswerRequest(inputs=[pb.QuestionContext(question="Who?", context="Bob is here.")]))
    assert response.model == "qa" and len(response.results) == 1 and len(response.results[0].answers) == 1
