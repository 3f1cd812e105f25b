"""Answer extraction and comparison: `\\boxed{}`, normalised exact match, token F1, math equivalence.

Token F1 and normalisation follow the SQuAD convention the reference uses (lower case, no punctuation, no
articles, collapsed whitespace). Math equivalence asks math-verify first (it parses LaTeX and compares
symbolically); where it is not installed, or fails, a sympy comparison of the plain expressions stands in.
math-verify's own timeouts use `signal.alarm`, which only works on the main thread, so off the main thread it
runs without one (the inputs are short boxed answers).
"""
from __future__ import annotations

import re
import string
import threading
from collections import Counter

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def extract_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` (nested braces handled), or None."""
    start = text.rfind("\\boxed")
    while start >= 0:
        i = start + len("\\boxed")
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            depth, j = 0, i
            while j < len(text):
                depth += {"{": 1, "}": -1}.get(text[j], 0)
                if depth == 0:
                    return text[i + 1: j].strip()
                j += 1
        start = text.rfind("\\boxed", 0, start)
    return None


def normalize_answer(text: str) -> str:
    text = "".join(c for c in text.lower() if c not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _as_list(ground_truth) -> list[str]:
    if isinstance(ground_truth, (list, tuple)):
        return [str(g) for g in ground_truth]
    return [str(ground_truth)]


def exact_match(prediction: str, ground_truth) -> float:
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(g) for g in _as_list(ground_truth)))


YES_NO = ("yes", "no", "noanswer")


def token_f1(prediction: str, ground_truth) -> float:
    """Best token-level F1 of the normalised prediction against each acceptable ground truth. As in HotpotQA's
    evaluation and the reference: 0 against a truth when either side is yes / no / noanswer and they differ."""
    pred = normalize_answer(prediction)
    pred_tokens = pred.split()
    best = 0.0
    for gt in _as_list(ground_truth):
        norm_gt = normalize_answer(gt)
        if (pred in YES_NO or norm_gt in YES_NO) and pred != norm_gt:
            continue
        gt_tokens = norm_gt.split()
        common = sum((Counter(pred_tokens) & Counter(gt_tokens)).values())
        if common == 0:
            continue
        precision, recall = common / len(pred_tokens), common / len(gt_tokens)
        best = max(best, 2 * precision * recall / (precision + recall))
    return best


def _strip_latex(s: str) -> str:
    s = s.strip().strip("$").replace("\\left", "").replace("\\right", "").replace("\\!", "")
    s = re.sub(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}", r"((\1)/(\2))", s)
    s = re.sub(r"\\sqrt\{([^{}]*)\}", r"sqrt(\1)", s)
    s = s.replace("\\cdot", "*").replace("\\times", "*").replace("\\pi", "pi").replace("^", "**")
    return s.replace("{", "(").replace("}", ")").replace(",", "")


def _sympy_equal(a: str, b: str) -> bool:
    try:
        import sympy
        from sympy.parsing.sympy_parser import (implicit_multiplication_application, parse_expr,
                                                standard_transformations)

        rules = standard_transformations + (implicit_multiplication_application,)
        ea, eb = (parse_expr(_strip_latex(x), transformations=rules, evaluate=True) for x in (a, b))
        return bool(sympy.simplify(ea - eb) == 0)
    except Exception:  # noqa: BLE001 - unparsable means not provably equal
        return False


def math_equal(prediction: str, ground_truth, use_math_verify: bool = True) -> bool:
    """True when the prediction equals any ground truth mathematically (1/2 == 0.5 == \\frac{1}{2})."""
    if exact_match(prediction, ground_truth):
        return True
    main = threading.current_thread() is threading.main_thread()
    for gt in _as_list(ground_truth):
        try:
            if not use_math_verify:
                raise ImportError("math-verify disabled")
            from math_verify import parse, verify

            kw = {} if main else {"parsing_timeout": None}
            gold, pred = parse(f"${gt}$", **kw), parse(f"${prediction}$", **kw)
            if gold and pred and verify(gold, pred, **({} if main else {"timeout_seconds": None})):
                return True
        except Exception:  # noqa: BLE001 - math-verify missing or confused: fall back to sympy
            pass
        if _sympy_equal(prediction, gt):
            return True
    return False
