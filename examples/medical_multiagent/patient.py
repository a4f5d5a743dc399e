"""The patient: the role-play system prompt for an LLM patient, and a rule-based patient for training a doctor alone."""

from __future__ import annotations

import re

from examples.medical_multiagent.cases import Case, Finding
from examples.medical_multiagent.lexicon import (GROUP_WORDS, PAIN_WORDS, SYMPTOM_MATCHER, SYMPTOMS, normalize,
                                                 with_implied)

_STOP = frozenset("a an and any are as at be been do does did for from had has have how i in is it me my "
                  "of on or so that the this to was were what when where which with you your ever".split())
_ONSET = re.compile(r"\b(when did|how long|start|started|begin|began|since when|onset|come on|came on|first notice)",
                    re.I)
_HISTORY = re.compile(r"\b(history|medication|medicine|tablets|pills|smoke|smoking|drink|alcohol|conditions?|"
                      r"family|travel|surgery|operations?|allerg|illness|diagnosed|past|before|vaccin|work|contact|"
                      r"recently|diet|pregnan)", re.I)
_OPEN = re.compile(r"\b(what brings|how can i help|what seems|what's wrong|what is wrong|tell me|describe|"
                   r"anything else|any other|other symptoms|what else|more about|how are you)", re.I)
_EXAM_OR_TEST = re.compile(r"\b(examine|examination|blood pressure|pulse|temperature reading|test results?|"
                           r"x-ray|scan|lab)", re.I)
_DIAGNOSIS = re.compile(r"\b(what do you think|diagnos|what you have|cause of)", re.I)


FREE_TEXT_KEYS = ("self_report", "response_")  # findings of MTMedDialog cases (mtmed.to_case): the patient's words


def _sex_word(case: Case) -> str:
    return "woman" if case.sex == "female" else "man"


def _who(case: Case) -> str:
    """'a 43-year-old woman', or 'a patient' when age and sex are unknown (MTMedDialog cases)."""
    if case.age > 0 and case.sex in ("female", "male"):
        return f"a {case.age}-year-old {_sex_word(case)}"
    return "a patient"


def patient_brief_prompt(case: Case) -> str:
    """A short version of `patient_system_prompt` (for small models trained by SFT): who, symptoms, onset, rules."""
    symptoms = "; ".join(f"I've {RuleBasedPatient.finding_phrase(f)}" for f in case.symptoms)
    history = "; ".join(case.history) or "nothing of note"
    onset = f" {case.onset}" if case.onset else ""
    return (f"You are {_who(case)} seeing a doctor. Your symptoms, and no others: "
            f"{symptoms}.{onset} Background: {history}. Answer in one plain sentence, truthfully; "
            "never name a disease.")


def patient_system_prompt(case: Case, brief: bool = False) -> str:
    """The LLM patient's role-play instructions, built from the case (`brief`: `patient_brief_prompt`)."""
    if brief:
        return patient_brief_prompt(case)
    symptoms = "\n".join(f"- I've {RuleBasedPatient.finding_phrase(f)}" for f in case.symptoms)
    history = "\n".join(f"- {h}" for h in case.history) or "- nothing of note"
    onset = f"\nHow it started: {case.onset}" if case.onset else ""
    return (
        f"You are role-playing a patient visiting a doctor. You are {_who(case)}.\n"
        f"Your main complaint: I've {RuleBasedPatient.finding_phrase(case.chief_complaint)}.\n"
        f"What you are experiencing (all true, nothing else is):\n{symptoms}{onset}\n"
        f"Background:\n{history}\n\n"
        "Rules:\n"
        "- Speak like an ordinary person, in everyday words, not medical terms. Keep answers to one or two sentences.\n"
        "- Answer only what the doctor asks. Do not list all your symptoms at once.\n"
        "- Be truthful: never claim a symptom that is not in the list above; if asked about one, say you do not "
        "have it.\n"
        "- You do not know your diagnosis. Never name or guess a disease, even if asked.\n"
        "- You do not know examination findings or test results; the doctor must find those out.\n"
        "- Open with one sentence about your main complaint.")


class RuleBasedPatient:
    """Answers a doctor's questions from a case by keyword matching, in lay words, truthfully and one topic at
    a time."""

    def __init__(self, case: Case):
        self.case = case
        self._has = case.symptom_keys()
        self._told: set[str] = set()

    def opening(self) -> str:
        """The first thing the patient says: who they are and the chief complaint."""
        self._told.add(self.case.chief_complaint.key)
        if self.case.chief_complaint.key.startswith(FREE_TEXT_KEYS):
            return self.case.chief_complaint.text
        return (f"Hello doctor. I'm a {self.case.age}-year-old {_sex_word(self.case)}, and I've "
                f"{self.finding_phrase(self.case.chief_complaint)}.")

    @staticmethod
    def finding_phrase(f: Finding) -> str:
        """How the patient says they have it: lexicon wording, or a DDXPlus question answered yes."""
        if f.key in SYMPTOMS:
            return f.text
        if f.key.startswith(FREE_TEXT_KEYS):
            return f"said: {f.text.rstrip('.')}"
        return f"had this: {f.text.rstrip('?')}"

    def _findings_for(self, key: str) -> list[Finding]:
        """The case's findings that are this symptom or a more specific kind of it."""
        return [f for f in self.case.symptoms if key in with_implied([f.key] + SYMPTOM_MATCHER.keys(f.text))]

    def _tell(self, findings: list[Finding]) -> str:
        self._told.update(f.key for f in findings)
        return " and I've ".join(self.finding_phrase(f) for f in findings)

    def _about_symptoms(self, asked: list[str]) -> str:
        parts = []
        for key in asked:
            found = self._findings_for(key)
            free = [f for f in found if f.key.startswith(FREE_TEXT_KEYS)]
            if free:  # the patient's own words (MTMedDialog cases)
                self._told.update(f.key for f in free)
                parts.append("Yes. " + " ".join(f.text for f in free))
            elif found:
                parts.append(f"Yes, I've {self._tell(found)}.")
            else:
                parts.append(f"No, I haven't {SYMPTOMS[key].lay}.")
        return " ".join(dict.fromkeys(parts))

    def _about_group(self, keys: list[str], none: str) -> str:
        found = [f for f in self.case.symptoms if f.key in keys]
        return f"Yes, I've {self._tell(found)}." if found else none

    def _about_history(self, question: str) -> str:
        words = {w for w in re.findall(r"[a-z]+", normalize(question)) if w not in _STOP and len(w) > 2}
        stems = {w[:5] for w in words}
        relevant = [h for h in self.case.history if stems & {w[:5] for w in re.findall(r"[a-z]+", h.lower())}]
        if relevant:
            return "Yes: " + "; ".join(relevant) + "."
        if re.search(r"\b(history|background|conditions?|anything else)\b", question, re.I) and self.case.history:
            return "Some background: " + "; ".join(self.case.history) + "."
        return "No, nothing like that."

    def _by_overlap(self, question: str) -> str | None:
        """Findings worded like the question (for cases whose findings are not in the symptom lexicon)."""
        words = {w for w in re.findall(r"[a-z]+", normalize(question)) if w not in _STOP and len(w) > 3}
        best, best_overlap = None, 1
        for f in self.case.symptoms:
            overlap = len(words & set(re.findall(r"[a-z]+", f.text.lower())))
            if overlap > best_overlap:
                best, best_overlap = f, overlap
        if best is not None and best.key.startswith(FREE_TEXT_KEYS):
            self._told.add(best.key)
            return best.text
        return None if best is None else f"Yes, I've {self._tell([best])}."

    def answer(self, question: str) -> str:
        """The patient's reply to one doctor turn."""
        if not question.strip():
            return "Sorry, what would you like to know?"
        if _DIAGNOSIS.search(question) and not SYMPTOM_MATCHER.keys(question):
            return "I really don't know, that's why I came to see you."
        asked = SYMPTOM_MATCHER.keys(question)
        if asked:
            return self._about_symptoms(asked)
        if _ONSET.search(question) and self.case.onset:
            return self.case.onset
        if _OPEN.search(question):
            untold = [f for f in self.case.symptoms if f.key not in self._told][:2]
            return f"Well, I've also {self._tell(untold)}." if untold else "No, I think that's everything."
        q = normalize(question)
        if any(re.search(rf"\b{w}\b", q) for w in PAIN_WORDS):
            pain = [k for k in self._has if "pain" in k or k in ("headache", "sore_throat", "joint_pain")]
            for group, words in GROUP_WORDS.items():
                if any(re.search(rf"\b{re.escape(w)}\b", q) for w in words):
                    in_group = [k for k in pain if SYMPTOMS[k].group == group]
                    return self._about_group(in_group, "No, no pain there.")
            return self._about_group(pain, "No, I'm not in any pain.")
        for group, words in GROUP_WORDS.items():
            if any(re.search(rf"\b{re.escape(w)}\b", q) for w in words):
                return self._about_group([k for k, s in SYMPTOMS.items() if s.group == group],
                                         "No, no problems there.")
        if _HISTORY.search(question):
            return self._about_history(question)
        if _EXAM_OR_TEST.search(question):
            return "I don't know, doctor. You would have to check that."
        return self._by_overlap(question) or "I'm not sure what you mean, doctor."
