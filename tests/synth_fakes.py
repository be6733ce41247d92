"""A scripted stand-in for synth-math's generator and seed problems in GSM8K's layout, shared
by tests/test_synth_math.py and the processes it starts (with tests/ on their sys.path)."""

from solar_merge import synth_math as sm

GSM8K = [  # GSM8K's layout: calculator annotations, final answer after ####
    {"question": "Tom has 12 red pens and buys 5 blue pens. How many pens does he have?",
     "answer": "Tom has 12 + 5 = <<12+5=17>>17 pens.\n#### 17"},
    {"question": "A shop sells 30 cakes a day for 4 days. How many cakes does it sell?",
     "answer": "It sells 30 * 4 = <<30*4=120>>120 cakes.\n#### 120"},
    {"question": "Mia had 1,200 dollars and spent 450. How much money is left?",
     "answer": "1,200 - 450 = <<1200-450=750>>750\n#### 750"},
]


class Fake(sm.Generator):
    """Scripted replies: script[seed question] = [(rephrased question, rephrased answer), ...]
    per sample; None as a text: cut by the token limit. Records what it was asked."""

    name = "fake"

    def __init__(self, script, fail_after=None):
        self.script, self.asked, self.fail_after = script, [], fail_after

    def count_tokens(self, text):
        return len(text.split())

    def generate(self, conversations, *, max_new_tokens, n, temperature, seed):
        if self.fail_after is not None and len(self.asked) >= self.fail_after:
            raise KeyboardInterrupt  # what Ctrl-C does in the middle of a run
        out = []
        for conv in conversations:
            prompt = conv[-1]["content"]
            is_answer = prompt.startswith("Rewrite")
            question = (prompt.split("Question: ", 1)[1].split("\nSolution:")[0] if is_answer
                        else prompt.split(":\n", 1)[1])
            self.asked.append((question, "answer" if is_answer else "question"))
            rows = []
            for k in range(n):
                text = self.script[question][k][int(is_answer)]
                if text is None:
                    rows.append(sm.Generation("and so on " * 50, False, 150))
                else:
                    rows.append(sm.Generation(text, True, len(text.split())))
            out.append(rows)
        return out


def good(seed):
    """A rephrasing that passes every check."""
    q = seed["question"]
    final = seed["answer"].rsplit("#### ", 1)[1]
    return (f"Here is the same problem in other words: {q}",
            f"Step by step, we work it out.\nThe answer is {final}.")
