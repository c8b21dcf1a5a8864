"""How LLaVA-Bench is judged: a GPT-4 judge compares the model's answer with GPT-4's own, and scores both from 1 to 10.

    python evaluate.py score llava_bench --questions questions.jsonl --context context.jsonl \\
        --reference answers_gpt4.jsonl --answers llava_bench.jsonl --runs 3 --reviews-dir reviews/

This is LLaVA's llava/eval/eval_gpt_review_bench.py, written against any OpenAI-compatible /chat/completions endpoint
with the standard library alone. For each question the judge sees the image's human-written description (the
"context"; the judge never sees the image), the question, GPT-4's reference answer as Assistant 1 and the model's as
Assistant 2, and the rule of the question's category (llava/eval/table/rule.json, llava_bench_{conv,detail,complex}).
It replies with a line "score1 score2" and an explanation. LLaVA's settings: gpt-4-0314, temperature 0.2, at most 1024
new tokens. A run writes one review file in LLaVA's format {id, question_id, answer1_id, answer2_id, category, content,
tuple}; benchmarks.py turns the reviews into the relative score (llava/eval/summarize_gpt_review.py).

The API key is read from an environment variable (--judge-key-env) and only ever sent in the Authorization header, to
the --judge-endpoint alone: redirects are not followed (urllib would send the header on to wherever one points), and
nothing the server answers is printed before the key is struck out of it. It is not logged or written to any file.
The files are read and written by benchmarks.py; this file asks. chat_completion is the project's one client of such
an endpoint: tools/instruct_data.py generates LLaVA's instruction data through it too (its flags --gpt-*). The same
client grades MM-Vet (grade_mmvet) and asks GPT-4 again where it and LLaVA disagree on ScienceQA, the first paper's
ensemble (requery_scienceqa; `evaluate.py score scienceqa_gpt4`).
"""

import argparse
import http.client
import json
import os
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

from data import UserError
from generate import non_negative_float, non_negative_int, positive_int

JUDGE_SYSTEM = "You are a helpful and precise assistant for checking the quality of the answer."
# LLaVA's llava/eval/table/rule.json, llava_bench_{conv,detail,complex}; --rules reads the file itself.
JUDGE_RULE = ("We would like to request your feedback on the performance of two AI assistants in response to the user "
              "question displayed above. The user asks the question on observing an image. For your reference, the "
              "visual content in the image is represented with a few sentences describing the image. \nPlease rate "
              "the helpfulness, relevance, accuracy, level of details of their responses. Each assistant receives an "
              "overall score on a scale of 1 to 10, where a higher score indicates better overall performance.\n"
              "Please first output a single line containing only two values indicating the scores for Assistant 1 "
              "and 2, respectively. The two scores are separated by a space.\nIn the subsequent line, please provide a "
              "comprehensive explanation of your evaluation, avoiding any potential bias and ensuring that the order "
              "in which the responses were presented does not affect your judgment.")


def parse_review(content):
    """LLaVA's parse_score: the first line, commas as spaces, split on single spaces; exactly two numbers, else
    [-1, -1] (which then stays in the means, as in LLaVA)."""
    parts = content.split("\n")[0].replace(",", " ").split(" ")
    try:
        return [float(parts[0]), float(parts[1])] if len(parts) == 2 else [-1.0, -1.0]
    except ValueError:
        return [-1.0, -1.0]


# ----------------------------------------------------------------------------------------------------------------------
# The client


def api_key(args, prefix="judge"):
    """The API key, from the environment variable --judge-key-env names (never a flag: it would be logged). `prefix`
    names the flags of another caller of the same client (tools/instruct_data.py: --gpt-key-env)."""
    env = getattr(args, f"{prefix}_key_env")
    key = os.environ.get(env, "")
    if not key:
        raise UserError(f"--{prefix}-key-env {env}: the environment variable is not set; export the API key in it")
    return key


def endpoint_problem(endpoint):
    """What keeps the key from being sent to `endpoint`, or None: it must be an http(s) URL with a host and nothing
    after its path (the client appends /chat/completions); not file://, a bare host name, credentials in the URL."""
    url = urllib.parse.urlsplit(endpoint)
    if url.scheme not in ("http", "https") or not url.hostname:
        return "not an http(s) URL; pass an OpenAI-compatible API base URL, e.g. https://api.openai.com/v1"
    if url.username or url.password or url.query or url.fragment:
        return ("a URL with credentials, a query or a fragment; pass the API base URL alone (the key goes in an "
                "environment variable)")
    return None


def endpoint_flag(text):
    """--judge-endpoint's argparse type: a bad value (or $JUDGE_ENDPOINT) is refused as the command line is read."""
    problem = endpoint_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(f"{text!r}: {problem}")
    return text


class NoRedirects(urllib.request.HTTPRedirectHandler):
    """A 3xx stays an HTTPError: following it would send the Authorization header to another host."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


OPENER = urllib.request.build_opener(NoRedirects)
MAX_BODY = 2**24  # what is read of a reply: a completion of 1,024 tokens is some kB; an endpoint sending more is wrong


def redacted(text, key, limit=200):
    """What a server said, safe to print: the key struck out (and any 8+ character piece of it, or word holding
    it), whitespace folded, cut to `limit` characters."""
    text = " ".join(text.replace(key, "***").split()) if key else " ".join(text.split())
    if key:
        text = re.sub(r"[\w\-+/=]{8,}", lambda m: "***" if m.group() in key or key in m.group() else m.group(), text)
    return text[:limit] + ("..." if len(text) > limit else "")


def error_message(body, key):
    """An error response's message: OpenAI's {"error": {"message"}} when it is that, else the text; redacted."""
    text = body.decode("utf-8", errors="replace")
    try:
        error = json.loads(text).get("error")
    except (ValueError, AttributeError):
        error = None
    message = error.get("message") if isinstance(error, dict) else error
    return redacted(message if isinstance(message, str) else text, key)


def completion_text(body, endpoint, info=None, prefix="judge"):
    """The reply's text from a chat completion body, or an error saying what came instead. A dict `info` receives
    the reply's finish_reason ("length": cut at max_tokens) and its token counts (usage's prompt_tokens and
    completion_tokens, 0 where the server sends none)."""
    try:
        reply = json.loads(body)
        choice = reply["choices"][0]
        content = choice["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise UserError(f"{prefix} endpoint {endpoint} answered HTTP 200 but not with a chat completion; is it an "
                        "OpenAI-compatible API base URL (e.g. https://api.openai.com/v1)?") from None
    if not isinstance(content, str):
        raise UserError(f"{prefix} endpoint {endpoint} sent a completion without text (content {content!r:.40}); "
                        f"a refusal or a content filter; try again, or another --{prefix}-model")
    if info is not None:
        usage = reply.get("usage") if isinstance(reply, dict) and isinstance(reply.get("usage"), dict) else {}
        info["finish_reason"] = choice.get("finish_reason") if isinstance(choice, dict) else None
        for name in ("prompt_tokens", "completion_tokens"):
            count = usage.get(name)
            info[name] = count if isinstance(count, int) and not isinstance(count, bool) and count >= 0 else 0
    return content


def chat_completion(messages, endpoint, model, api_key, temperature=0.2, max_tokens=1024, retries=5, backoff=2.0,
                    timeout=120, info=None, prefix="judge"):
    """One reply from an OpenAI-compatible /chat/completions endpoint, standard library only. Retries connection
    errors, 429 and 5xx with exponential back-off (a judge run is hundreds of requests; one busy minute should not lose
    it). Other answers fail at once, retrying cannot fix them: an HTTP error (a wrong key, a wrong model name), a
    redirect (the key goes to the endpoint named, nowhere else), a 200 that is not a chat completion (a wrong URL).
    `info` (a dict) receives the reply's finish_reason and token counts (completion_text); `prefix` names the
    caller's flags in errors (--judge-endpoint; --gpt-endpoint for tools/instruct_data.py). Safe to call from several
    threads at once: nothing is shared between calls."""
    refused = endpoint_problem(endpoint)
    if refused:
        raise UserError(f"--{prefix}-endpoint {endpoint!r}: {refused}")
    body = json.dumps({"model": model, "messages": messages, "temperature": temperature,
                       "max_tokens": max_tokens}).encode()
    url = endpoint.rstrip("/") + "/chat/completions"
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {api_key}"})
    for attempt in range(retries + 1):
        try:
            with OPENER.open(request, timeout=timeout) as response:
                return completion_text(response.read(MAX_BODY), endpoint, info, prefix)
        except urllib.error.HTTPError as e:
            if 300 <= e.code < 400:
                to = urllib.parse.urlsplit(urllib.parse.urljoin(url, e.headers.get("Location", "")))
                raise UserError(f"{prefix} endpoint {endpoint} redirects (HTTP {e.code}) to "
                                f"{to.scheme}://{to.netloc.rpartition('@')[2]}{to.path}; the key is not sent on: "
                                f"pass the final URL (without /chat/completions) as --{prefix}-endpoint") from None
            if e.code != 429 and e.code < 500:
                said = error_message(e.read(MAX_BODY), api_key)
                raise UserError(f"{prefix} endpoint {endpoint} answered HTTP {e.code}: {said}; check "
                                f"--{prefix}-endpoint, --{prefix}-model and the key in --{prefix}-key-env") from None
            problem = f"HTTP {e.code}"
        except (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError) as e:
            problem = redacted(str(getattr(e, "reason", e)), api_key)
        if attempt < retries:
            print(f"{prefix}: {problem}; retrying in {backoff * 2 ** attempt:.0f} s", file=sys.stderr)
            time.sleep(backoff * 2 ** attempt)
    raise UserError(f"{prefix} endpoint {endpoint}: still failing after {retries} retries ({problem}); check that it "
                    f"is up and reachable, or raise --{prefix}-retries")


# ----------------------------------------------------------------------------------------------------------------------
# Judging LLaVA-Bench


def review_prompt(caption, question, reference, answer, rule):
    """The user message, laid out exactly as eval_gpt_review_bench.py does (the judge was never tuned to another)."""
    role = rule["role"]
    return (f"[Context]\n{chr(10).join(caption) if isinstance(caption, list) else caption}\n\n"
            f"[Question]\n{question}\n\n"
            f"[{role} 1]\n{reference}\n\n[End of {role} 1]\n\n"
            f"[{role} 2]\n{answer}\n\n[End of {role} 2]\n\n"
            f"[System]\n{rule['prompt']}\n\n")


def judge_llava_bench(questions, captions, reference, answers, rules, args):
    """One judge run over the questions: a review per question, GPT-4's reference as Assistant 1. The inputs as
    benchmarks.judge_and_score reads and checks them: the question file's records, image -> caption, question_id
    (a str) -> the reference's and the model's answer records, and LLaVA's rule.json ({} for the built-in rule)."""
    key = api_key(args)
    reviews = []
    for i, q in enumerate(questions):
        qid = str(q["question_id"])
        rule = rules.get(f"llava_bench_{q['category']}", {"prompt": JUDGE_RULE, "role": "Assistant"})
        content = review_prompt(captions[q["image"]], q["text"], reference[qid]["text"], answers[qid]["text"], rule)
        reply = chat_completion([{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": content}],
                                args.judge_endpoint, args.judge_model, key, retries=args.judge_retries,
                                backoff=args.judge_backoff)
        reviews.append({"id": i + 1, "question_id": q["question_id"],
                        "answer1_id": reference[qid].get("answer_id", q["question_id"]),
                        "answer2_id": answers[qid].get("answer_id"), "category": f"llava_bench_{q['category']}",
                        "content": reply, "tuple": parse_review(reply)})
    return reviews


def add_flags(p):
    """The flags judge_llava_bench reads, as one group of `score llava_bench`'s help."""
    g = p.add_argument_group("judging (when there are no --reviews yet)")
    g.add_argument("--questions", help="LLaVA-Bench's questions.jsonl")
    g.add_argument("--context", help="context.jsonl: each image's description, which the judge reads")
    g.add_argument("--reference", help="GPT-4's answers (answers_gpt4.jsonl), shown as Assistant 1")
    g.add_argument("--answers", help="the model's answers (from `evaluate.py run`), shown as Assistant 2")
    g.add_argument("--rules", help="LLaVA's llava/eval/table/rule.json (default: its rule, built in)")
    g.add_argument("--runs", type=positive_int, default=3, help="judge runs; LLaVA reports the mean of 3")
    g.add_argument("--reviews-dir", default="reviews", help="where each run's review file goes")
    endpoint_flags(g, "gpt-4-0314")


def add_endpoint_flags(p, default_model, title="the judge (asked only for what the grade file lacks)"):
    """The judge's endpoint flags alone, for a benchmark whose other flags are its own (MM-Vet, ScienceQA's GPT-4
    ensemble)."""
    endpoint_flags(p.add_argument_group(title), default_model)


def endpoint_flags(g, default_model, prefix="judge", model_help="another judge gives other numbers"):
    """Where the model is and how it is asked: what chat_completion needs, and the key's environment variable.
    --judge-* for the judges; another prefix for another caller of the client (--gpt-* in tools/instruct_data.py)."""
    env = prefix.upper()
    g.add_argument(f"--{prefix}-endpoint", type=endpoint_flag,
                   default=os.environ.get(f"{env}_ENDPOINT", "https://api.openai.com/v1"),
                   help=f"an OpenAI-compatible API base URL (default: ${env}_ENDPOINT or OpenAI's)")
    g.add_argument(f"--{prefix}-model", default=os.environ.get(f"{env}_MODEL", default_model),
                   help=f"default {default_model}; {model_help}")
    g.add_argument(f"--{prefix}-key-env", default="OPENAI_API_KEY", help="the environment variable holding the key")
    g.add_argument(f"--{prefix}-retries", type=non_negative_int, default=5)
    g.add_argument(f"--{prefix}-backoff", type=non_negative_float, default=2.0,
                   help="seconds before the first retry, doubled each time")


# ----------------------------------------------------------------------------------------------------------------------
# Grading MM-Vet (yuweihao/MM-Vet, mm-vet_evaluator.py): the grader reads a few-shot table and completes the last
# row's correctness, 0.0 to 1.0. Its settings: gpt-4-0613 ("gpt-4" in LLaVA's grade files), temperature 0, 3 tokens.
# The prompt is the official text verbatim, long lines and all (the same in the 2023 notebook and the 2024 script).

MMVET_PROMPT = """Compare the ground truth and prediction from AI models, to give a correctness score for the prediction. <AND> in the ground truth means it is totally right only when all elements in the ground truth are present in the prediction, and <OR> means it is totally right when any one element in the ground truth is present in the prediction. The correctness score is 0.0 (totally wrong), 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, or 1.0 (totally right). Just complete the last space of the correctness score.

Question | Ground truth | Prediction | Correctness
--- | --- | --- | ---
What is x in the equation? | -1 <AND> -5 | x = 3 | 0.0
What is x in the equation? | -1 <AND> -5 | x = -1 | 0.5
What is x in the equation? | -1 <AND> -5 | x = -5 | 0.5
What is x in the equation? | -1 <AND> -5 | x = -5 or 5 | 0.5
What is x in the equation? | -1 <AND> -5 | x = -1 or x = -5 | 1.0
Can you explain this meme? | This meme is poking fun at the fact that the names of the countries Iceland and Greenland are misleading. Despite its name, Iceland is known for its beautiful green landscapes, while Greenland is mostly covered in ice and snow. The meme is saying that the person has trust issues because the names of these countries do not accurately represent their landscapes. | The meme talks about Iceland and Greenland. It's pointing out that despite their names, Iceland is not very icy and Greenland isn't very green. | 0.4
Can you explain this meme? | This meme is poking fun at the fact that the names of the countries Iceland and Greenland are misleading. Despite its name, Iceland is known for its beautiful green landscapes, while Greenland is mostly covered in ice and snow. The meme is saying that the person has trust issues because the names of these countries do not accurately represent their landscapes. | The meme is using humor to point out the misleading nature of Iceland's and Greenland's names. Iceland, despite its name, has lush green landscapes while Greenland is mostly covered in ice and snow. The text 'This is why I have trust issues' is a playful way to suggest that these contradictions can lead to distrust or confusion. The humor in this meme is derived from the unexpected contrast between the names of the countries and their actual physical characteristics. | 1.0
"""
MMVET_RETRY = "\nPredict the correctness of the answer (digit): "


def mmvet_request(question, truth, prediction):
    """The user message: the prompt, a newline, then "question | key | prediction | " (spaces around <AND>, <OR>)."""
    truth = truth.replace("<AND>", " <AND> ").replace("<OR>", " <OR> ")
    return MMVET_PROMPT + "\n" + " | ".join([question, truth, prediction, ""])


def mmvet_score(content):
    """The reply's first space-separated word as a number from 0 to 1, else None."""
    try:
        score = float(content.split(" ")[0].strip())
    except ValueError:
        return None
    return score if 0.0 <= score <= 1.0 else None


def grade_mmvet_sample(request, ask):
    """One grade as the official loop gets it: ask(request, temperature 0); while the reply is no score, ask again
    with MMVET_RETRY appended, at temperature 0, 0.5, 1, 1.5, 2; the fifth retry's reply is not read: 0.0.
    Returns (content, score), content being the score's word when there is one, as the grade file keeps it."""
    content, temperature, tries = ask(request, 0.0), 0.0, 1
    while (score := mmvet_score(content)) is None:
        content = ask(request + MMVET_RETRY, temperature)
        tries, temperature = tries + 1, temperature + 0.5
        if tries > 5:
            return content, 0.0
    return content.split(" ")[0].strip(), score


def grade_mmvet(metadata, results, grades, runs, args, save):
    """Grades every answered sample up to `runs` times, extending `grades`, MM-Vet's grade file {id: {"model" (the
    name asked for), "content", "score"}: one entry per run}, and calling save(grades) after each grade, so that a
    stopped run resumes. Samples without an answer are not sent. The API key is looked up only when something is left
    to grade."""
    key = None
    for run in range(runs):
        for sample_id, sample in metadata.items():
            if sample_id not in results or len(grades.get(sample_id, {}).get("score", [])) > run:
                continue
            if "answer" not in sample:
                raise UserError(f"MM-Vet sample {sample_id}: no 'answer' (the key) to grade its answer against; is "
                                "--mmvet-json MM-Vet's mm-vet.json?")
            if key is None:
                key = api_key(args)

            def ask(content, temperature):
                return chat_completion([{"role": "user", "content": content}], args.judge_endpoint, args.judge_model,
                                       key, temperature=temperature, max_tokens=3, retries=args.judge_retries,
                                       backoff=args.judge_backoff)

            content, score = grade_mmvet_sample(mmvet_request(sample["question"], sample["answer"],
                                                              results[sample_id]), ask)
            grade = grades.setdefault(sample_id, {"model": [], "content": [], "score": []})
            grade["model"].append(args.judge_model)
            grade["content"].append(content)
            grade["score"].append(score)
            save(grades)
    return grades


# ----------------------------------------------------------------------------------------------------------------------
# ScienceQA's GPT-4 ensemble (the first LLaVA paper, section 5.2): where LLaVA and text-only GPT-4 answer differently,
# GPT-4 is "prompted again, asking it to provide its own final answer based on the question and two outcomes". The
# paper gives no prompt and LLaVA's code has none (eval_science_qa_gpt4_requery.py reads the replies from a file), so
# this one is ours, written to that description: the question as the model saw it (context and options, no image),
# both answers with their reasoning, and the ScienceQA scripts' answer format. Which answer is whose is not said.

SQA_REQUERY_SYSTEM = "You are a helpful assistant."
SQA_REQUERY = ("{question}\n\nTwo answers to this question follow, each with its reasoning. They disagree.\n\n"
               "[Answer 1]\n{first}\n[End of Answer 1]\n\n[Answer 2]\n{second}\n[End of Answer 2]\n\n"
               "Based on the question and the two answers, give your own final answer. Explain briefly, then end with "
               "\"The answer is X.\", X being the letter of the option.")


def requery_scienceqa(cases, args, save):
    """Asks the judge about each (question_id, question, GPT-4's answer, the model's answer), GPT-4's shown first,
    and save(question_id, record) each reply as it comes: {question_id, prompt, text, model_id}, the line LLaVA's
    scorer reads (its --requery-result). Temperature 0: a judge's verdict should not be drawn by lot."""
    key = api_key(args)
    for qid, question, gpt4, ours in cases:
        content = SQA_REQUERY.format(question=question, first=gpt4, second=ours)
        reply = chat_completion([{"role": "system", "content": SQA_REQUERY_SYSTEM},
                                 {"role": "user", "content": content}], args.judge_endpoint, args.judge_model, key,
                                temperature=0.0, retries=args.judge_retries, backoff=args.judge_backoff)
        save(qid, {"question_id": qid, "prompt": content, "text": reply, "model_id": args.judge_model})
