"""Symptom and test vocabularies (clinical and lay words) and the phrase matcher that finds them in text."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Symptom:
    """A symptom: how a patient says they have it, the words that name it, its body system."""

    key: str
    lay: str  # reads after "I've" and "I haven't": "had a fever", "been very tired"
    phrases: tuple[str, ...]
    group: str
    implies: tuple[str, ...] = ()  # broader symptoms this one is a kind of ("productive_cough" -> "cough")


def _s(key: str, lay: str, group: str, *phrases: str, implies: tuple[str, ...] = ()) -> Symptom:
    bare = re.sub(r"^(had|been) ", "", lay)  # "had chills" -> "chills"
    return Symptom(key, lay, tuple(dict.fromkeys((lay, bare, *phrases))), group, implies)


SYMPTOMS: dict[str, Symptom] = {s.key: s for s in [
    # general
    _s("fever", "had a fever", "general", "fever", "feverish", "high temperature", "a temperature", "febrile",
       "running hot"),
    _s("chills", "had chills", "general", "shivering", "shivers", "rigors", "shaking chills"),
    _s("fatigue", "been very tired", "general", "fatigue", "tired", "tiredness", "exhausted", "no energy",
       "low energy", "worn out", "lethargic", "weakness all over"),
    _s("body_aches", "been aching all over", "general", "body aches", "muscle aches", "myalgia", "achy",
       "aching muscles"),
    _s("night_sweats", "had night sweats", "general", "sweating at night", "soaked sheets"),
    _s("sweating", "been sweating a lot", "general", "sweating", "sweaty", "diaphoresis", "clammy", "cold sweat"),
    _s("weight_loss", "lost weight without trying", "general", "weight loss", "losing weight", "lost weight"),
    _s("weight_gain", "put on weight", "general", "weight gain", "gained weight", "gaining weight"),
    _s("loss_of_appetite", "lost my appetite", "general", "loss of appetite", "poor appetite", "not hungry",
       "anorexia", "off my food"),
    _s("cold_intolerance", "felt cold all the time", "general", "cold intolerance", "always cold", "feeling cold"),
    _s("excessive_thirst", "been very thirsty", "general", "thirsty", "excessive thirst", "polydipsia"),
    _s("dry_skin", "had dry skin", "skin", "skin is dry"),
    _s("pale_skin", "looked pale", "skin", "pale", "pallor"),
    # head and nerves
    _s("headache", "had a headache", "head", "headache", "head hurts", "head pain", "pain in my head",
       "head is pounding"),
    _s("one_sided_headache", "had a throbbing headache on one side", "head", "one-sided headache", "one sided headache",
       "throbbing headache", "pounding on one side", "unilateral headache", implies=("headache",)),
    _s("band_headache", "had a tight band-like pressure around my head", "head", "band around my head",
       "tight band", "pressure around my head", "band-like headache", implies=("headache",)),
    _s("thunderclap_headache", "had the worst headache of my life, all of a sudden", "head", "worst headache",
       "thunderclap headache", "sudden severe headache", implies=("headache",)),
    _s("light_sensitivity", "been sensitive to light", "head", "sensitive to light", "light sensitivity",
       "photophobia", "bright light bothers", "light bothers"),
    _s("sound_sensitivity", "been sensitive to noise", "head", "sensitive to noise", "sensitive to sound",
       "phonophobia", "noise bothers"),
    _s("visual_aura", "seen flashing zigzag lights before it starts", "head", "aura", "zigzag lines", "flashing lights",
       "visual disturbance"),
    _s("neck_stiffness", "had a stiff neck", "head", "neck stiffness", "stiff neck", "can't bend my neck"),
    _s("confusion", "been confused", "head", "confusion", "confused", "disoriented", "muddled", "not thinking clearly"),
    _s("dizziness", "felt light-headed", "head", "dizzy", "dizziness", "light-headed", "lightheaded", "woozy"),
    _s("vertigo", "had the room spinning when I move my head", "head", "vertigo", "room spinning", "spinning",
       "room is spinning"),
    _s("fainting", "fainted", "head", "fainting", "passed out", "blacked out", "syncope", "faint"),
    _s("one_sided_weakness", "had weakness down one side", "head", "weakness on one side", "weak arm", "weak leg",
       "can't move my arm", "hemiparesis", "one-sided weakness"),
    _s("facial_droop", "had one side of my face drooping", "head", "face drooping", "facial droop", "droopy face",
       "face droop"),
    _s("slurred_speech", "had slurred speech", "head", "slurring", "trouble speaking", "can't get my words out",
       "difficulty speaking", "speech problems"),
    _s("numbness", "had numbness", "head", "numb", "tingling", "pins and needles", "loss of feeling"),
    # ear, nose and throat
    _s("sore_throat", "had a sore throat", "throat", "sore throat", "throat pain", "throat hurts", "scratchy throat",
       "painful swallowing", "hurts to swallow", "pharyngitis"),
    _s("runny_nose", "had a runny nose", "throat", "runny nose", "rhinorrhea", "dripping nose", "nose running"),
    _s("congestion", "had a blocked nose", "throat", "stuffy nose", "blocked nose", "nasal congestion", "congested",
       "stuffed up", "congestion"),
    _s("sneezing", "been sneezing", "throat", "sneezing", "sneeze", "sneezes"),
    _s("itchy_eyes", "had itchy watery eyes", "throat", "itchy eyes", "watery eyes", "eyes itch"),
    _s("facial_pain", "had pain and pressure in my face", "throat", "facial pain", "sinus pain", "sinus pressure",
       "pressure in my face", "pain behind my eyes", "cheeks hurt"),
    _s("loss_of_smell", "lost my sense of smell or taste", "throat", "loss of smell", "can't smell", "loss of taste",
       "can't taste", "anosmia"),
    _s("swollen_glands", "had swollen glands in my neck", "throat", "swollen glands", "swollen lymph nodes",
       "lumps in my neck", "lymphadenopathy"),
    _s("hoarse_voice", "had a hoarse voice", "throat", "hoarse", "hoarseness", "lost my voice"),
    # breathing
    _s("cough", "had a cough", "breathing", "cough", "coughing"),
    _s("dry_cough", "had a dry cough", "breathing", "dry cough", "tickly cough", "non-productive cough",
       implies=("cough",)),
    _s("productive_cough", "had a cough bringing up phlegm", "breathing", "productive cough", "coughing up phlegm",
       "phlegm", "mucus", "sputum", "coughing up mucus", "wet cough", implies=("cough",)),
    _s("coughing_blood", "coughed up blood", "breathing", "coughing up blood", "blood in my phlegm", "hemoptysis",
       implies=("cough",)),
    _s("shortness_of_breath", "been short of breath", "breathing", "short of breath", "shortness of breath",
       "breathless", "out of breath", "can't catch my breath", "trouble breathing", "difficulty breathing",
       "breathing problems", "dyspnea", "dyspnoea", "winded"),
    _s("orthopnea", "been breathless lying flat and needed extra pillows", "breathing", "lying flat", "orthopnea",
       "extra pillows", "wake up gasping", implies=("shortness_of_breath",)),
    _s("wheezing", "been wheezing", "breathing", "wheeze", "wheezing", "whistling when I breathe", "wheezy"),
    _s("chest_tightness", "had a tight feeling in my chest", "breathing", "chest tightness", "tight chest",
       "chest feels tight", "tightness in my chest"),
    # heart and vessels
    _s("chest_pain", "had pain in my chest", "chest", "chest pain", "chest hurts", "chest discomfort",
       "pain in the chest"),
    _s("pressure_chest_pain", "had a crushing pressure in my chest", "chest", "crushing chest pain",
       "pressure in my chest", "chest pressure", "heavy chest", "squeezing chest", "elephant on my chest",
       implies=("chest_pain",)),
    _s("pleuritic_chest_pain", "had a sharp chest pain when I breathe in", "chest", "pain when I breathe",
       "hurts to breathe", "sharp chest pain", "pleuritic", "stabbing chest pain", "pain on breathing in",
       implies=("chest_pain",)),
    _s("exertional_chest_pain", "had chest pain when I exert myself that goes with rest", "chest",
       "chest pain on exertion", "pain when I walk", "pain with exercise", "exertional", "goes away with rest",
       "climbing stairs", implies=("chest_pain",)),
    _s("radiating_arm_pain", "had pain spreading to my arm or jaw", "chest", "arm pain", "jaw pain", "pain in my arm",
       "pain in my jaw", "radiates to the arm", "radiating", "spreads to my arm", "left arm"),
    _s("palpitations", "had my heart racing or fluttering", "chest", "palpitations", "heart racing", "racing heart",
       "pounding heart", "fluttering", "irregular heartbeat", "heart skipping", "heart pounding"),
    _s("leg_swelling", "had swollen ankles", "chest", "swollen legs", "leg swelling", "swollen ankles",
       "ankle swelling", "swollen feet", "edema", "oedema", "puffy ankles"),
    _s("one_leg_swelling", "had one leg swollen and painful", "skin", "one leg swollen", "swollen calf",
       "calf swelling", "calf pain", "leg is swollen", "painful calf", "calf hurts", implies=("leg_swelling",)),
    # stomach and bowels
    _s("abdominal_pain", "had stomach pain", "stomach", "abdominal pain", "stomach pain", "belly pain", "tummy pain",
       "stomach ache", "stomachache", "belly ache", "tummy hurts", "tummy ache", "pain in my stomach",
       "stomach hurts", "belly hurts"),
    _s("rlq_pain", "had pain low down on the right side of my belly", "stomach", "right lower quadrant",
       "lower right", "right lower abdomen", "right side of my belly", "rlq", implies=("abdominal_pain",)),
    _s("periumbilical_pain", "had pain that started around my belly button", "stomach", "around my belly button",
       "belly button", "periumbilical", "navel", implies=("abdominal_pain",)),
    _s("ruq_pain", "had pain under my right ribs", "stomach", "right upper quadrant", "upper right",
       "under my right ribs", "right upper abdomen", "ruq", implies=("abdominal_pain",)),
    _s("llq_pain", "had pain low down on the left side of my belly", "stomach", "left lower quadrant", "lower left",
       "left lower abdomen", "llq", implies=("abdominal_pain",)),
    _s("epigastric_pain", "had a burning pain in the upper middle of my stomach", "stomach", "epigastric",
       "upper stomach", "upper abdominal pain", "pit of my stomach", "upper middle", "upper belly",
       implies=("abdominal_pain",)),
    _s("pain_to_back", "had pain going through to my back", "stomach", "goes through to my back", "radiates to my back",
       "into my back", "through to the back", "band around my upper belly"),
    _s("pelvic_pain", "had pain low in my pelvis", "stomach", "pelvic pain", "pelvis", "lower belly pain",
       "lower abdominal pain", implies=("abdominal_pain",)),
    _s("nausea", "felt sick to my stomach", "stomach", "nausea", "nauseous", "nauseated", "queasy",
       "sick to my stomach", "feel sick"),
    _s("vomiting", "been throwing up", "stomach", "vomiting", "vomit", "vomited", "throwing up", "threw up",
       "being sick", "emesis"),
    _s("diarrhea", "had diarrhea", "stomach", "diarrhoea", "loose stools", "runny stools", "watery stools", "the runs"),
    _s("constipation", "been constipated", "stomach", "constipation", "constipated", "can't go to the toilet"),
    _s("black_stool", "had black tarry stools", "stomach", "black stool", "black stools", "tarry stools", "melena",
       "dark stools", "blood in my stool"),
    _s("heartburn", "had heartburn", "stomach", "burning in my chest", "acid in my throat",
       "burning behind my breastbone", "indigestion", "sour taste", "regurgitation", "acid coming up"),
    _s("bloating", "felt bloated", "stomach", "bloated", "bloating", "swollen belly"),
    _s("pain_after_meals", "had pain after fatty meals", "stomach", "after eating", "after meals", "after fatty food",
       "after a big meal", "fatty meals"),
    _s("jaundice", "had yellowing of my skin or eyes", "skin", "yellow skin", "yellow eyes", "jaundice", "jaundiced",
       "turned yellow"),
    # urinary
    _s("painful_urination", "had burning when I pee", "urinary", "burning when I urinate", "burning when I pee",
       "painful urination",
       "dysuria", "stings when I pee", "pain when I pee", "burning urine", "hurts to pee"),
    _s("frequent_urination", "needed to pee very often", "urinary", "frequent urination", "peeing a lot",
       "urinating often", "going to the toilet a lot", "frequency", "pee often", "urinate often"),
    _s("urgency", "had sudden urges to pee", "urinary", "urgency", "urgent need to pee", "can't hold it"),
    _s("blood_in_urine", "had blood in my urine", "urinary", "blood in urine", "pink urine", "red urine", "hematuria",
       "haematuria", "bloody urine"),
    _s("flank_pain", "had pain in my side, between the ribs and hip", "urinary", "flank pain", "pain in my side",
       "side pain", "loin pain", "kidney pain", "pain in my back near the kidney", "flank"),
    _s("colicky_pain", "had waves of pain that come and go", "urinary", "comes in waves", "colicky", "waves of pain",
       "can't get comfortable", "writhing"),
    # muscles, joints, skin
    _s("joint_pain", "had a painful joint", "joints", "joint pain", "painful joint", "joint hurts", "arthralgia"),
    _s("joint_swelling", "had a red, hot, swollen joint", "joints", "swollen joint", "joint swelling", "red joint",
       "hot joint", "big toe", implies=("joint_pain",)),
    _s("back_pain", "had back pain", "joints", "back pain", "low back pain", "backache", "back hurts", "lower back"),
    _s("sciatic_pain", "had pain shooting down my leg", "joints", "shooting down my leg", "down the back of my leg",
       "sciatica", "radiates down my leg", "shooting pain in my leg", implies=("back_pain",)),
    _s("rash", "had a rash", "skin", "rash", "spots", "skin eruption"),
    _s("blistering_rash", "had a painful band of blisters on one side", "skin", "blisters", "blistering rash",
       "band of blisters", "vesicles", implies=("rash",)),
    _s("hives", "had itchy raised welts", "skin", "hives", "welts", "urticaria", "itchy bumps"),
    _s("skin_redness", "had a red, hot, swollen patch of skin", "skin", "red skin", "redness", "skin is red",
       "warm skin", "red patch", "spreading redness", "skin swelling"),
    _s("skin_pain", "had burning or tingling pain in my skin", "skin", "skin pain", "burning skin", "skin hurts",
       "sensitive skin", "tender skin"),
    _s("lip_swelling", "had my lips and tongue swell up", "skin", "lip swelling", "swollen lips", "swollen tongue",
       "throat closing", "face swelling", "swollen face"),
    # mind and hormones
    _s("anxiety", "had a sense of panic or dread", "mind", "anxious", "anxiety", "panic", "sense of doom", "dread",
       "scared", "fear of dying", "nervous"),
    _s("trembling", "been shaking or trembling", "mind", "trembling", "tremor", "shaky", "shaking"),
    _s("tingling_hands", "had tingling in my hands and around my mouth", "mind", "tingling hands", "tingling fingers",
       "tingling around my mouth", "numb fingers"),
    _s("missed_period", "missed a period", "women", "missed period", "period is late", "late period", "no period",
       "missed my period"),
    _s("vaginal_bleeding", "had some vaginal bleeding or spotting", "women", "vaginal bleeding", "spotting",
       "bleeding down below"),
    _s("depressed_mood", "felt low", "mind", "depressed", "low mood", "feeling down", "feeling low", "sad"),
]}

#: Words of open questions about a body system ("any problems with your breathing?") -> group.
GROUP_WORDS: dict[str, tuple[str, ...]] = {
    "general": ("generally", "in yourself", "overall", "energy"),
    "head": ("head", "neurological", "vision", "speech", "balance"),
    "throat": ("throat", "nose", "ears", "sinuses", "cold symptoms"),
    "breathing": ("breathing", "breath", "lungs", "chest symptoms"),
    "chest": ("heart", "chest"),
    "stomach": ("stomach", "belly", "tummy", "bowels", "bowel", "digestion", "abdominal", "eating"),
    "urinary": ("urine", "urinary", "waterworks", "pee", "peeing", "wee", "bladder", "kidneys"),
    "joints": ("joints", "muscles", "back", "bones"),
    "skin": ("skin", "legs", "leg"),
    "mind": ("mood", "stress", "nerves", "feelings"),
    "women": ("periods", "pregnant", "pregnancy", "menstrual"),
}
PAIN_WORDS = ("pain", "painful", "hurt", "hurts", "hurting", "ache", "aching", "sore", "discomfort", "tender")


@dataclass(frozen=True)
class LabTest:
    """A test the doctor can order: canonical name, other names, and its result when nothing is wrong."""

    name: str
    aliases: tuple[str, ...]
    normal: str


def _t(name: str, normal: str, *aliases: str) -> LabTest:
    return LabTest(name, aliases, normal)


TESTS: dict[str, LabTest] = {t.name: t for t in [
    _t("complete blood count", "white cells 7.2 x10^9/L, hemoglobin 13.9 g/dL, platelets 250 x10^9/L (normal)",
       "cbc", "blood count", "full blood count", "fbc", "white count", "white blood cell count", "hemoglobin", "wbc"),
    _t("basic metabolic panel", "sodium 139, potassium 4.1, bicarbonate 25, creatinine 0.9 mg/dL (normal)",
       "bmp", "electrolytes", "chem 7", "kidney function", "renal function", "creatinine", "metabolic panel", "cmp",
       "chemistry", "u&e"),
    _t("c-reactive protein", "CRP 3 mg/L (normal)", "crp", "inflammatory markers"),
    _t("blood glucose", "glucose 95 mg/dL (normal)", "glucose", "fingerstick glucose", "blood sugar", "bm"),
    _t("pulse oximetry", "oxygen saturation 98% on room air", "oxygen saturation", "spo2", "sats", "pulse ox",
       "oxygen level"),
    _t("urinalysis", "no leukocytes, nitrites, blood or protein (normal)", "ua", "urine dipstick", "urine test",
       "urine analysis", "dipstick"),
    _t("urine culture", "no growth", "urine mcs"),
    _t("ecg", "normal sinus rhythm, no ST changes", "ekg", "electrocardiogram", "12-lead", "12 lead"),
    _t("troponin", "high-sensitivity troponin below the 99th percentile (normal)", "trop", "cardiac enzymes",
       "cardiac markers"),
    _t("chest x-ray", "clear lungs, normal heart size", "cxr", "chest xray", "chest radiograph", "x-ray of the chest",
       "chest film", "chest x ray"),
    _t("d-dimer", "D-dimer 0.3 mg/L FEU (normal)", "d dimer", "ddimer"),
    _t("ct pulmonary angiogram", "no pulmonary embolism", "ctpa", "ct angiogram", "ct pe study",
       "ct chest with contrast"),
    _t("bnp", "NT-proBNP 60 pg/mL (normal)", "nt-probnp", "brain natriuretic peptide", "pro-bnp", "probnp"),
    _t("echocardiogram", "normal ventricular size and function, ejection fraction 60%", "echo", "cardiac ultrasound"),
    _t("leg ultrasound", "compressible deep veins, no thrombus", "doppler ultrasound", "compression ultrasound",
       "venous duplex", "duplex ultrasound", "venous doppler", "leg doppler"),
    _t("ct head", "no bleed, mass or infarct", "head ct", "ct brain", "ct scan of the head", "brain ct",
       "ct of the head"),
    _t("mri brain", "normal brain", "brain mri", "mri of the brain", "mri head"),
    _t("lumbar puncture", "clear CSF, normal cells, protein and glucose", "lp", "spinal tap", "csf analysis", "csf"),
    _t("blood cultures", "no growth", "blood culture"),
    _t("lactate", "lactate 1.1 mmol/L (normal)", "lactic acid"),
    _t("liver function tests", "bilirubin, ALT, AST and alkaline phosphatase normal", "lfts", "lft", "liver panel",
       "liver enzymes", "bilirubin"),
    _t("lipase", "lipase 35 U/L (normal)", "serum lipase", "amylase", "pancreatic enzymes"),
    _t("abdominal ultrasound", "normal gallbladder, bile ducts, liver and kidneys", "right upper quadrant ultrasound",
       "ruq ultrasound", "ultrasound of the abdomen", "gallbladder ultrasound", "abdominal us", "abdominal ultrasound"),
    _t("ct abdomen", "no acute abnormality in the abdomen or pelvis", "ct abdomen and pelvis", "abdominal ct",
       "ct scan of the abdomen", "ct of the abdomen", "ct abdomen pelvis"),
    _t("ct kidneys", "no stones, no hydronephrosis", "ct kub", "non-contrast ct", "stone protocol ct", "ct urogram"),
    _t("stool studies", "no pathogens detected", "stool culture", "stool test", "stool sample"),
    _t("h. pylori test", "negative", "h pylori", "h. pylori", "helicobacter", "urea breath test", "stool antigen"),
    _t("upper endoscopy", "normal esophagus, stomach and duodenum", "egd", "endoscopy", "gastroscopy"),
    _t("pregnancy test", "negative", "beta hcg", "hcg", "urine pregnancy test", "serum hcg", "b-hcg"),
    _t("pelvic ultrasound", "normal uterus and ovaries", "transvaginal ultrasound", "tvus", "pelvic us"),
    _t("rapid strep test", "negative", "strep test", "throat swab", "throat culture", "rapid antigen test"),
    _t("influenza test", "negative", "flu test", "flu swab", "rapid influenza test", "influenza pcr", "flu pcr"),
    _t("covid-19 test", "negative", "covid test", "sars-cov-2 pcr", "covid pcr", "covid swab", "covid antigen test",
       "covid-19 pcr", "covid"),
    _t("monospot", "negative", "heterophile antibody test", "ebv serology", "mono test", "mononucleosis test"),
    _t("blood gas", "pH 7.40, pCO2 40 mmHg, bicarbonate 24 (normal)", "abg", "vbg", "arterial blood gas",
       "venous blood gas"),
    _t("ketones", "no ketones", "serum ketones", "beta-hydroxybutyrate", "urine ketones", "blood ketones"),
    _t("peak flow", "peak flow 95% of predicted", "peak expiratory flow", "pefr"),
    _t("spirometry", "normal FEV1/FVC ratio", "lung function test", "pft", "pulmonary function test"),
    _t("uric acid", "urate 5.2 mg/dL (normal)", "serum urate", "urate"),
    _t("joint aspiration", "clear fluid, no crystals, no organisms", "arthrocentesis", "synovial fluid analysis",
       "joint fluid", "aspirate the joint"),
    _t("iron studies", "ferritin 90 ng/mL, normal iron and transferrin saturation", "ferritin", "serum iron",
       "transferrin", "iron levels"),
    _t("tsh", "TSH 1.8 mIU/L, free T4 normal", "thyroid function tests", "thyroid panel", "free t4",
       "thyroid stimulating hormone", "tfts", "thyroid function", "thyroid test"),
    _t("mri lumbar spine", "normal lumbar spine", "lumbar mri", "mri spine", "mri back", "mri of the lumbar spine"),
    _t("dix-hallpike test", "negative, no nystagmus", "dix hallpike", "hallpike"),
    _t("vzv pcr", "negative", "lesion swab", "vesicle swab", "varicella pcr", "herpes zoster pcr"),
    _t("allergy testing", "no sensitisation", "skin prick test", "specific ige", "ige", "allergy test"),
]}


NEGATION = re.compile(r"\b(no|not|never|without|none|nor|neither|deny|denies|nothing)\b|n't\b", re.I)
_CLAUSE_BREAK = re.compile(r"[.!?;,:]|\bbut\b|\bthough\b|\bhowever\b", re.I)


_PRONOUNS = {"you": "i", "your": "my", "you've": "i've", "you're": "i'm", "yourself": "myself"}
_PRONOUN = re.compile(r"\b(you've|you're|yourself|your|you)\b")


def normalize(text: str) -> str:
    """Lower case, curly quotes straightened, space collapsed, second person as first ("your chest" = "my chest")."""
    text = re.sub(r"\s+", " ", text.lower().replace("’", "'")).strip()
    return _PRONOUN.sub(lambda m: _PRONOUNS[m.group(1)], text)


class PhraseMatcher:
    """Finds the longest non-overlapping phrases of a vocabulary in text, with word boundaries and plurals."""

    def __init__(self, phrases: Mapping[str, Iterable[str]]):
        by_phrase: dict[str, str] = {}
        for key, names in phrases.items():
            for p in names:
                by_phrase.setdefault(normalize(p), key)
        ordered = sorted(by_phrase, key=len, reverse=True)
        body = "|".join(re.escape(p).replace(r"\ ", r"\s+") for p in ordered)
        self._pattern = re.compile(rf"(?<![\w-])({body})(?:e?s)?(?![\w-])", re.I)
        self._key = by_phrase

    def find(self, text: str) -> list[tuple[str, int, int]]:
        """(key, start, end) of every match in `normalize(text)`, left to right."""
        text = normalize(text)
        return [(self._key[normalize(m.group(1))], m.start(), m.end()) for m in self._pattern.finditer(text)]

    def keys(self, text: str) -> list[str]:
        """Keys mentioned in the text, first mention order, without repeats."""
        return list(dict.fromkeys(k for k, _, _ in self.find(text)))


SYMPTOM_MATCHER = PhraseMatcher({k: s.phrases for k, s in SYMPTOMS.items()})
TEST_MATCHER = PhraseMatcher({k: (k, *t.aliases) for k, t in TESTS.items()})


def symptom_mentions(text: str) -> list[tuple[str, bool]]:
    """(symptom key, asserted) for every symptom mentioned; asserted is False when its clause is negated."""
    norm = normalize(text)
    out = []
    for key, start, _ in SYMPTOM_MATCHER.find(norm):
        clause_start = max((m.end() for m in _CLAUSE_BREAK.finditer(norm, 0, start)), default=0)
        out.append((key, not NEGATION.search(norm[clause_start:start])))
    return out


def with_implied(keys: Iterable[str]) -> set[str]:
    """The keys plus every broader symptom they imply."""
    out: set[str] = set()
    stack = list(keys)
    while stack:
        k = stack.pop()
        if k not in out:
            out.add(k)
            stack.extend(SYMPTOMS[k].implies if k in SYMPTOMS else ())
    return out


def resolve_test(name: str) -> str | None:
    """The canonical test name for how a doctor wrote it ("CXR", "chest x-ray please"), or None."""
    norm = normalize(name)
    for key, test in TESTS.items():
        if norm == key or norm in test.aliases:
            return key
    found = TEST_MATCHER.find(norm)
    return max(found, key=lambda f: f[2] - f[1])[0] if found else None
