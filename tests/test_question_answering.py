"""question-answering over the wire equals transformers 4.57's pipeline on the same model.

transformers 5 has no question-answering pipeline; the reference is 4.57's own, run by one
subprocess of the reference virtualenv (tests/transformers4.py) that answers every case of this
module at once: windows over long contexts (answers crossing a window's edge, words cut by it),
every parameter, "no answer", and the call shapes.
"""

from __future__ import annotations

import concurrent.futures
import random
from dataclasses import dataclass

import grpc
import pytest

from pipeserve.client import pipeline
from pipeserve.v1 import question_answering_pb2 as pb
from pipeserve.v1 import question_answering_pb2_grpc as pb_grpc
from tests.parity import assert_same_results
from tests.rpc_errors import expect_invalid_argument
from tests.transformers4 import answer_cases

WORDS = ("the a server model city river Berlin Paris answered quickly slowly engineer tokenizer window "
         "boundary blue green unbelievably café 2024 , .").split()


def random_text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def _cases() -> dict[str, tuple[tuple, dict]]:
    """name -> (positional arguments, keyword arguments) of a call, the same for 4.x and pipeserve."""
    rng = random.Random(11)
    cases: dict[str, tuple[tuple, dict]] = {
        "defaults-long-context": ((), {"question": "Where does the engineer live?", "context": random_text(rng, 700)}),
        "windows-and-top-k": ((), {"question": "Who?", "context": random_text(rng, 80), "top_k": 3, "max_seq_len": 32,
                                   "doc_stride": 8}),
        "impossible-answer": ((), {"question": "Who?", "context": random_text(rng, 80), "handle_impossible_answer": True,
                                   "top_k": 2}),
        "impossible-in-windows": ((), {"question": "Who?", "context": "Bob lives in Berlin. " * 12, "top_k": 40,
                                       "max_seq_len": 32, "doc_stride": 8, "handle_impossible_answer": True}),
        "not-aligned-to-words": ((), {"question": "Who?", "context": random_text(rng, 40), "align_to_words": False,
                                      "top_k": 2}),
        "short-answers": ((), {"question": "Who?", "context": random_text(rng, 40), "max_answer_len": 3, "top_k": 5}),
        "max-question-len-no-effect": ((), {"question": random_text(rng, 12) + "?", "context": random_text(rng, 60),
                                            "max_question_len": 4, "max_seq_len": 48, "doc_stride": 4}),
        "padding": ((), {"question": "Who?", "context": random_text(rng, 40), "padding": "max_length"}),
        "topk-spelling": ((), {"question": "Who?", "context": random_text(rng, 40), "topk": 2}),
        "two-strings": (("Who is it?", "It is Bob, from Paris."), {}),
        "one-dict": (({"question": "Who lives in Berlin?", "context": "Wolfgang lives in Berlin."},), {}),
        "list-of-one": (([{"question": "Who lives in Berlin?", "context": "Wolfgang lives in Berlin."}],), {}),
        "list-of-dicts": (([{"question": "Where is Paris?", "context": "Paris is in France, on the Seine."},
                            {"question": "Who?", "context": "Bob is here."}],), {}),
        "questions-one-context": ((), {"question": ["Who?", "Where?"], "context": "Bob is here in Berlin."}),
        "questions-and-contexts": ((), {"question": ["Who?", "Where?"], "context": ["Bob is here.", "In Paris."]}),
        "several-answers-of-one": (({"question": "Who lives in Berlin?", "context": "Wolfgang lives in Berlin."},),
                                   {"top_k": 3}),
    }
    for seed in range(8):
        r = random.Random(seed)
        question, context = random_text(r, r.randint(1, 6)) + "?", random_text(r, r.randint(5, 150))
        cases[f"random-{seed}"] = ((), {"question": question, "context": context,
                                        "max_seq_len": r.choice([24, 32, 64]), "doc_stride": r.choice([2, 4, 8]),
                                        "max_answer_len": r.choice([1, 3, 15]), "top_k": r.choice([1, 3]),
                                        "handle_impossible_answer": seed % 2 == 0})
    return cases


CASES = _cases()


@pytest.fixture(scope="module")
def transformers4(model_repository, tmp_path_factory):
    answers = answer_cases([("question-answering", model_repository / "qa", list(args), kwargs)
                            for args, kwargs in CASES.values()], tmp_path_factory.mktemp("qa4"))
    return dict(zip(CASES, answers))


@pytest.fixture(scope="module")
def qa(target):
    with pipeline("question-answering", target=target) as remote:
        yield remote


@pytest.mark.parametrize("name", sorted(CASES))
def test_answers_equal_transformers_4(qa, transformers4, name):
    args, kwargs = CASES[name]
    assert "error" not in transformers4[name], transformers4[name]
    assert_same_results(qa(*args, **kwargs), transformers4[name])


def test_an_answer_crossing_a_window_edge_and_a_word_cut_by_one_are_found_as_4x_finds_them(qa, transformers4):
    args, kwargs = CASES["windows-and-top-k"]
    answers = qa(*args, **kwargs)
    assert len(answers) == 3
    for answer in answers:
        assert kwargs["context"][answer["start"] : answer["end"]] == answer["answer"]


def test_impossible_answer(qa):
    # Nothing in the context to answer with: "no answer" is all that is left.
    assert qa(question="Who?", context="   ", handle_impossible_answer=True) == {"score": 1.0, "start": 0, "end": 0, "answer": ""}
    assert qa(question="Who?", context="   ") == []


@dataclass
class SquadLike:
    """What transformers' SquadExample holds of a question and its context."""

    question_text: str
    context_text: str


def test_squad_examples_and_4x_keywords(qa, transformers4):
    expected = transformers4["one-dict"]
    example = SquadLike("Who lives in Berlin?", "Wolfgang lives in Berlin.")
    assert_same_results(qa(example), expected)
    assert_same_results(qa(X=[example]), expected)
    assert_same_results(qa(data={"question": example.question_text, "context": example.context_text}), expected)
    assert_same_results(qa(example, example), [expected, expected])
    with pytest.raises(ValueError, match="cannot be empty"):
        qa({"question": "", "context": "x"})
    with pytest.raises(KeyError):
        qa({"question": "Who?"})


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


def assert_same_answers(ours, expected):
    assert_same_results(ours if isinstance(ours, list) else [ours], expected)


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
