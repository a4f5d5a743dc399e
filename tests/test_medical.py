"""Medical doctor-patient example: case table and generator, split, DDXPlus loader, patient, rewards, doctor env."""

import json

import pytest

from envs.multiturn import run_episode
from examples.medical_multiagent.cases import (CONDITIONS, Case, generate_case, generate_cases, load_ddxplus,
                                               split_of)
from examples.medical_multiagent.conditions import CONDITIONS_LIST
from examples.medical_multiagent.doctor_env import DoctorEnv, case_sample, order_test_result
from examples.medical_multiagent.lexicon import SYMPTOMS, resolve_test, symptom_mentions
from examples.medical_multiagent.patient import RuleBasedPatient, patient_system_prompt
from examples.medical_multiagent.rewards import (DoctorRewardConfig, diagnosis_matches, doctor_reward,
                                                 parse_diagnosis, patient_reward)
from kiln_common.sample import Status


def _case(condition: str, **overrides) -> Case:
    for i in range(200):
        c = generate_case(i, seed=11, condition=condition)
        if all(k in {f.key for f in c.symptoms} for k in overrides.get("with_symptoms", ())):
            return c
    raise AssertionError(f"no {condition} case with {overrides}")


# ---------------------------------------------------------------- table and generator

def test_condition_table_is_broad_and_consistent():
    assert len(CONDITIONS) >= 40
    required = {"pneumonia", "influenza", "covid-19", "streptococcal pharyngitis", "migraine", "tension headache",
                "acute appendicitis", "acute cholecystitis", "urinary tract infection", "pyelonephritis",
                "kidney stone", "gastroesophageal reflux disease", "peptic ulcer disease", "myocardial infarction",
                "stable angina", "pulmonary embolism", "asthma exacerbation", "copd exacerbation",
                "congestive heart failure", "deep vein thrombosis", "cellulitis", "gout"}
    assert required <= set(CONDITIONS)
    for c in CONDITIONS_LIST:
        assert len(c.symptoms) >= 2 and c.exam and c.tests and c.distractors and c.name not in c.distractors


def test_generator_is_deterministic_and_index_stable():
    a, b = generate_cases(300, seed=3), generate_cases(300, seed=3)
    assert [c.to_dict() for c in a] == [c.to_dict() for c in b]
    assert generate_case(250, seed=3).to_dict() == a[250].to_dict()  # case i does not depend on how many
    assert [c.to_dict() for c in generate_cases(50, seed=4)] != [c.to_dict() for c in a[:50]]
    assert len({c.case_id for c in generate_cases(3000, seed=0)}) == 3000


def test_generated_cases_are_plausible():
    cases = generate_cases(2000, seed=1)
    assert len({c.condition for c in cases}) == len(CONDITIONS)
    for c in cases:
        cond = CONDITIONS[c.condition]
        assert cond.age[0] <= c.age <= cond.age[1] and c.sex in ("female", "male")
        assert len(c.symptoms) >= 2 and {f.key for f in c.symptoms} <= set(cond.symptoms)
        assert c.chief_complaint == c.symptoms[0] and c.exam and c.onset.startswith("It began")
        for test, result in cond.tests.items():
            assert c.tests[test] in (result if isinstance(result, tuple) else (result,))
        if c.sex == "male":
            assert "pregnancy test" not in c.tests and not any("period" in h for h in c.history)
    ectopic = [c for c in cases if c.condition == "ectopic pregnancy"]
    assert ectopic and all(c.sex == "female" for c in ectopic)
    # symptom frequencies follow the table (fever in ~85% of pneumonia cases)
    pneumonia = [c for c in generate_cases(4000, seed=2) if c.condition == "pneumonia"]
    rate = sum("fever" in {f.key for f in c.symptoms} for c in pneumonia) / len(pneumonia)
    assert abs(rate - 0.85) < 0.08


def test_split_is_fixed_disjoint_and_about_ten_percent():
    train = generate_cases(900, seed=0, split="train")
    test = generate_cases(100, seed=0, split="test")
    assert not {c.case_id for c in train} & {c.case_id for c in test}
    assert all(c.split == "train" for c in train) and all(c.split == "test" for c in test)
    assert split_of("syn-0-000123") == split_of("syn-0-000123")
    everything = generate_cases(3000, seed=0)
    share = sum(c.split == "test" for c in everything) / len(everything)
    assert 0.08 < share < 0.12
    with pytest.raises(ValueError, match="split must be 'train', 'test' or None"):
        generate_cases(1, split="dev")


# ---------------------------------------------------------------- DDXPlus

EVIDENCES = {
    "E_91": {"name": "E_91", "question_en": "Do you have a fever (either felt or measured with a thermometer)?",
             "is_antecedent": False, "data_type": "B", "value_meaning": {}},
    "E_77": {"name": "E_77", "question_en": "Do you have a cough that produces colored or more abundant sputum?",
             "is_antecedent": False, "data_type": "B", "value_meaning": {}},
    "E_55": {"name": "E_55", "question_en": "Where is the pain located?", "is_antecedent": False, "data_type": "M",
             "value_meaning": {"V_101": {"en": "side of the chest(R)", "fr": "côté du thorax(D)"},
                               "V_102": {"en": "breast(R)", "fr": "sein(D)"}}},
    "E_69": {"name": "E_69", "question_en": "Do you smoke cigarettes?", "is_antecedent": True, "data_type": "B",
             "value_meaning": {}},
    "E_201": {"name": "E_201", "question_en": "Do you have a sore throat?", "is_antecedent": False,
              "data_type": "B", "value_meaning": {}},
}
CONDITIONS_JSON = {
    "Pneumonia": {"condition_name": "Pneumonia", "cond-name-fr": "Pneumonie", "cond-name-eng": "Pneumonia"},
    "URTI": {"condition_name": "URTI", "cond-name-fr": "IVRS", "cond-name-eng": "URTI"},
    "Whooping cough": {"condition_name": "Whooping cough", "cond-name-fr": "Coqueluche",
                       "cond-name-eng": "Whooping cough"},
}
CSV = (
    "AGE,DIFFERENTIAL_DIAGNOSIS,SEX,PATHOLOGY,EVIDENCES,INITIAL_EVIDENCE\n"
    "55,\"[['Pneumonia', 0.6], ['Bronchitis', 0.3], ['URTI', 0.1]]\",M,Pneumonia,"
    "\"['E_91', 'E_77', 'E_55_@_V_101', 'E_55_@_V_102', 'E_69']\",E_91\n"
    "8,\"[['URTI', 0.8]]\",F,URTI,\"['E_201']\",E_201\n"
    "30,\"[]\",F,Whooping cough,\"['E_77']\",E_77\n"
)


@pytest.fixture
def ddxplus_dir(tmp_path):
    (tmp_path / "release_evidences.json").write_text(json.dumps(EVIDENCES))
    (tmp_path / "release_conditions.json").write_text(json.dumps(CONDITIONS_JSON))
    (tmp_path / "release_test_patients.csv").write_text(CSV)
    return tmp_path


def test_ddxplus_loader(ddxplus_dir):
    cases = load_ddxplus(ddxplus_dir, "test")
    assert [c.case_id for c in cases] == ["ddxplus-test-0000000", "ddxplus-test-0000001", "ddxplus-test-0000002"]
    p, u, w = cases
    assert (p.condition, p.age, p.sex, p.source) == ("pneumonia", 55, "male", "ddxplus")
    assert "chest infection" in p.diagnosis_names and "Pneumonia" in p.diagnosis_names
    assert p.chief_complaint.key == "E_91" and [f.key for f in p.symptoms] == ["E_91", "E_77", "E_55"]
    assert p.symptoms[2].text == "Where is the pain located? side of the chest(R), breast(R)"
    assert p.history == ("Do you smoke cigarettes?",) and p.tests == {} and p.exam == ()
    assert p.distractors == ("Bronchitis", "URTI")
    assert {"fever", "productive_cough", "cough"} <= p.symptom_keys()
    assert u.condition == "common cold" and "URTI" in u.diagnosis_names  # mapped onto the table's synonym
    assert w.condition == "Whooping cough" and w.diagnosis_names == ("Whooping cough",)
    assert len(load_ddxplus(ddxplus_dir, "test", limit=2)) == 2
    assert order_test_result(p, "chest x-ray") == "chest x-ray: not available"
    assert diagnosis_matches("whooping cough", w) and not diagnosis_matches("pneumonia", w)


def test_ddxplus_loader_errors(ddxplus_dir):
    with pytest.raises(FileNotFoundError, match="no release_train_patients.csv"):
        load_ddxplus(ddxplus_dir, "train")
    (ddxplus_dir / "release_test_patients.csv").write_text("AGE,SEX\n3,M\n")
    with pytest.raises(ValueError, match=r"lacks columns \['EVIDENCES', 'INITIAL_EVIDENCE', 'PATHOLOGY'\]"):
        load_ddxplus(ddxplus_dir, "test")


# ---------------------------------------------------------------- lexicon and patient

@pytest.mark.parametrize("key", sorted(SYMPTOMS))
def test_lay_wording_is_recognised_asserted_and_denied(key):
    assert symptom_mentions(f"Yes, I've {SYMPTOMS[key].lay}.") == [(key, True)]
    assert symptom_mentions(f"No, I haven't {SYMPTOMS[key].lay}.") == [(key, False)]


def test_symptom_mentions_handle_clauses_and_lay_words():
    assert symptom_mentions("My tummy hurts and I threw up, but no fever or chills.") == [
        ("abdominal_pain", True), ("vomiting", True), ("fever", False), ("chills", False)]
    assert symptom_mentions("I can't catch my breath.") == [("shortness_of_breath", True)]


@pytest.mark.parametrize("text, name", [("CXR", "chest x-ray"), ("Please get a chest X-ray", "chest x-ray"),
                                        ("troponin level", "troponin"), ("ua", "urinalysis"), ("tarot", None)])
def test_resolve_test(text, name):
    assert resolve_test(text) == name


def test_rule_based_patient_answers_truthfully_in_lay_words():
    case = _case("pneumonia", with_symptoms=("fever", "productive_cough"))
    patient = RuleBasedPatient(case)
    assert patient.opening() == (
        f"Hello doctor. I'm a {case.age}-year-old {'woman' if case.sex == 'female' else 'man'}"
        f", and I've {case.chief_complaint.text}."
    )
    assert patient.answer("Do you have a cough?") == "Yes, I've had a cough bringing up phlegm."
    assert patient.answer("Any burning when you pee?") == "No, I haven't had burning when I pee."
    assert patient.answer("When did this start?") == case.onset
    assert "don't know" in patient.answer("What do you think is causing this?")
    dialogue = [(q, patient.answer(q)) for q in ("What brings you in?", "Any chest pain?", "Any diarrhea?",
                                                 "Anything else?", "Do you smoke?", "How is your breathing?")]
    reward, parts = patient_reward(case, dialogue)
    assert parts["faithfulness"] == 1.0 and parts["leaked"] == 0.0 and parts["answered"] == 1.0
    prompt = patient_system_prompt(case)
    assert all(name.lower() not in prompt.lower() for name in case.diagnosis_names)
    assert "Never name or guess a disease" in prompt
    assert all(f"I've {f.text}" in prompt for f in case.symptoms)


# ---------------------------------------------------------------- rewards on hand-written dialogues

@pytest.fixture(scope="module")
def appendicitis():
    return _case("acute appendicitis", with_symptoms=("rlq_pain", "nausea"))


def test_doctor_reward_correct_wrong_and_format(appendicitis):
    cfg = DoctorRewardConfig(max_turns=10)
    order = '<tool_call>{"name": "order_test", "arguments": {"test": "CT abdomen and pelvis"}}</tool_call>'
    turns = ["Where is the pain?", order, "Diagnosis: Acute appendicitis"]
    total, parts = doctor_reward(appendicitis, turns, cfg)
    assert parts == {"correct": 1.0, "format": 1.0, "efficiency": pytest.approx(0.7), "diagnostic_test": 1.0,
                     "tests_ordered": 1.0, "excess_tests": 0.0, "turns": 3.0, "total": pytest.approx(total)}
    assert total == pytest.approx(1.0 + 0.1 + 0.2 * 0.7 + 0.1)
    fast, _ = doctor_reward(appendicitis, ["Diagnosis: appendicitis."], cfg)
    slow, _ = doctor_reward(appendicitis, ["?"] * 7 + ["**Diagnosis:** appendicitis"], cfg)
    assert fast > slow > 1.0  # fewer turns is better; markdown bold still parses
    wrong, parts = doctor_reward(appendicitis, ["Diagnosis: gastroenteritis"], cfg)
    assert parts["correct"] == 0.0 and parts["format"] == 1.0 and wrong == pytest.approx(0.1)
    hedge, parts = doctor_reward(appendicitis, ["Diagnosis: appendicitis or kidney stone"], cfg)
    assert parts["correct"] == 0.0
    negated, _ = doctor_reward(appendicitis, ["Diagnosis: not appendicitis"], cfg)
    assert negated == pytest.approx(0.1)
    bad_format, parts = doctor_reward(appendicitis, ["I think it is appendicitis."], cfg)
    assert bad_format == 0.0 and parts["format"] == 0.0 and parts["correct"] == 0.0
    many = [order.replace("CT abdomen and pelvis", t) for t in ("cbc", "crp", "ecg", "cxr", "tsh")]
    spam, parts = doctor_reward(appendicitis, many + ["Diagnosis: appendicitis"], cfg)
    assert parts["excess_tests"] == 2.0 and parts["diagnostic_test"] == 1.0
    # the test bonus (like speed) counts only with the right diagnosis; the breakdown still records the test
    wrong_with_test, parts = doctor_reward(appendicitis, [order, "Diagnosis: gastroenteritis"], cfg)
    assert parts["diagnostic_test"] == 1.0 and parts["efficiency"] == 0.0 and wrong_with_test == pytest.approx(0.1)


@pytest.mark.parametrize("text, expected", [
    ("Diagnosis: Pneumonia", "Pneumonia"), ("blah\ndiagnosis:  acute cholecystitis.  ", "acute cholecystitis"),
    ("Diagnosis: a\nthen\nDiagnosis: b", "b"), ("Diagnosis:", None), ("My diagnosis is flu", None),
])
def test_parse_diagnosis(text, expected):
    assert parse_diagnosis(text) == expected


def test_patient_reward_faithful_leaked_hallucinated_off_topic(appendicitis):
    truthful = [("", "Hi doctor, I have pain in my lower right abdomen."),
                ("Do you feel sick?", "Yes, I've felt sick to my stomach."),
                ("Any blood in your urine?", "No, I haven't had blood in my urine.")]
    total, parts = patient_reward(appendicitis, truthful)
    assert parts["faithfulness"] == 1.0 and parts["answered"] == 1.0 and parts["leaked"] == 0.0
    assert parts["complaint"] == 1.0 and total == pytest.approx(2.0)
    leaked = truthful + [("What do you think it is?", "My friend said it sounds like appendicitis.")]
    total, parts = patient_reward(appendicitis, leaked)
    assert parts["leaked"] == 1.0 and total == pytest.approx(1.0)
    # opening without the chief complaint: nothing claimed is nothing unfaithful, but the complaint term is lost
    silent = [("", "Hello doctor.")] + truthful[1:]
    total, parts = patient_reward(appendicitis, silent)
    assert parts["faithfulness"] == 1.0 and parts["complaint"] == 0.0 and total == pytest.approx(1.5)
    vague = [("", "Hi doctor, I've felt sick to my stomach.")] + truthful[1:]  # true, but not the complaint
    assert patient_reward(appendicitis, vague)[1]["complaint"] == 0.0
    invented = truthful + [("Any headache?", "Yes, a terrible headache and I've been coughing up blood.")]
    total, parts = patient_reward(appendicitis, invented)
    assert parts["hallucinated"] == 2.0 and parts["claims"] == 5.0
    assert parts["faithfulness"] == pytest.approx(1 - 2 / 5)
    denied = [("Do you feel sick?", "No, I don't feel sick at all.")]
    assert patient_reward(appendicitis, denied)[1]["contradicted"] == 1.0
    off_topic = [("Do you have a fever?", "I like gardening."), ("When did it start?", "It is bad.")]
    assert patient_reward(appendicitis, off_topic)[1]["answered"] == 0.0


# ---------------------------------------------------------------- doctor env

async def test_doctor_env_tools_patient_and_reward(appendicitis):
    env = DoctorEnv()
    opening = await env.reset(case_sample(appendicitis))
    assert opening.startswith("Hello doctor.") and '"name": "order_test"' in env.system_prompt()
    answer = await env.step("Do you have a fever?")
    assert not answer.done and answer.observation.startswith(("Yes", "No"))
    tests = await env.step('<tool_call>{"name": "order_test", "arguments": {"test": "CBC"}}</tool_call>\n'
                           '<tool_call>{"name": "order_test", "arguments": {"test": "dragon scan"}}</tool_call>\n'
                           '<tool_call>{"name": "order_test", "arguments": {"tst": "CBC"}}</tool_call>\n'
                           '<tool_call>{"name": "order_test", "arguments": {"test": "CBC"}</tool_call>')
    obs = tests.observation
    assert f"complete blood count: {appendicitis.tests['complete blood count']}" in obs
    assert "dragon scan: not available" in obs
    assert "error: order_test: missing required argument(s) ['test']" in obs and "not valid JSON" in obs
    final = await env.step("Diagnosis: acute appendicitis")
    assert final.done and final.info["reward_breakdown"]["correct"] == 1.0
    assert final.reward == doctor_reward(appendicitis, env.doctor_turns)[0]


async def test_doctor_episode_through_run_episode(appendicitis, tokenizer_dir):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    turns = ["Where does it hurt?",
             '<tool_call>{"name": "order_test", "arguments": {"test": "ct abdomen"}}</tool_call>',
             "Diagnosis: appendicitis"]
    script = iter(turns)

    class Client:
        async def generate(self, input_ids, sampling_params, return_logprob=True, session_id=None):
            ids = tok.encode(next(script), add_special_tokens=False) + [tok.eos_token_id]
            return {"output_ids": ids, "meta_info": {"output_token_logprobs": [(-0.5, t, None) for t in ids],
                                                     "finish_reason": {"type": "stop"}, "weight_version": 0}}

    out = await run_episode(Client(), tok, DoctorEnv(), case_sample(appendicitis), {}, max_turns=5,
                            max_total_tokens=8192, step_timeout=5.0)
    assert out.status is Status.COMPLETED and out.metadata["turns"] == 3
    assert out.reward == pytest.approx(doctor_reward(appendicitis, turns)[0])
    text = tok.decode(out.tokens)
    assert appendicitis.tests["ct abdomen"] in text and out.loss_mask.count(1) < len(out.loss_mask)


def test_shared_opening_opens_with_a_symptom_the_look_alikes_share():
    """`--opening shared`: the chief complaint becomes the case's own symptom that the most of the conditions
    share; everything else about the case stays; the typical opening is the generator's."""
    from collections import Counter

    from examples.medical_multiagent.warm_start import CPU_CONDITIONS, SHARED_FREQUENCY, subset_cases

    share = Counter(k for name in CPU_CONDITIONS for k, f in CONDITIONS[name].symptoms.items()
                    if f >= SHARED_FREQUENCY)
    typical = subset_cases(60, "train", CPU_CONDITIONS)
    shared = subset_cases(60, "train", CPU_CONDITIONS, opening="shared")
    assert [c.case_id for c in typical] == [c.case_id for c in shared]
    moved = 0
    for t, s in zip(typical, shared):
        assert s.chief_complaint in t.symptoms and s.symptoms == t.symptoms and s.tests == t.tests
        assert share[s.chief_complaint.key] == max(share[f.key] for f in t.symptoms)
        moved += s.chief_complaint != t.chief_complaint
    assert moved >= 20  # most typical openings name a symptom few conditions have
    assert RuleBasedPatient(shared[0]).opening().endswith(f"I've {shared[0].chief_complaint.text}.")
    with pytest.raises(ValueError, match="opening='rare'"):
        subset_cases(1, "train", CPU_CONDITIONS, opening="rare")
