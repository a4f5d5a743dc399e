"""The condition table: common primary-care and emergency conditions with how they present.

Frequencies are approximate textbook presentation rates, good enough to make cases realistic and
look-alike conditions confusable; they are not clinical guidance.
"""

from __future__ import annotations

from dataclasses import dataclass

from examples.medical_multiagent.lexicon import SYMPTOMS, TESTS

H, D, W = 1, 24, 24 * 7  # hours, days, weeks in hours


@dataclass(frozen=True)
class Condition:
    """A diagnosis and its presentation: symptom frequencies, onset, history, exam, test results, look-alikes."""

    name: str
    synonyms: tuple[str, ...]
    symptoms: dict[str, float]  # symptom key -> fraction of patients who have it
    onset: str  # "suddenly", "gradually", "over a few days"
    onset_hours: tuple[int, int]  # how long ago it started, in hours
    age: tuple[int, int]
    female: float  # fraction of patients who are female
    history: tuple[tuple[str, float], ...]  # (risk factor / past history / medication, frequency)
    exam: tuple[tuple[str, float], ...]  # (finding, frequency)
    tests: dict[str, str | tuple[str, ...]]  # test -> result (a tuple: one is drawn per case)
    distractors: tuple[str, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name, *self.synonyms)


CONDITIONS_LIST: list[Condition] = [
    Condition(
        "pneumonia", ("community-acquired pneumonia", "bacterial pneumonia", "lobar pneumonia", "chest infection"),
        {"fever": .85, "productive_cough": .8, "shortness_of_breath": .65, "pleuritic_chest_pain": .4, "chills": .6,
         "fatigue": .7, "loss_of_appetite": .4, "confusion": .1},
        "over a few days", (2 * D, 7 * D), (18, 90), .5,
        (("smokes cigarettes", .3), ("has COPD", .15), ("had a cold last week", .3), ("has diabetes", .15)),
        (("temperature 38.7 C", .85), ("breathing 24 times a minute", .6), ("crackles over the right lower chest", .75),
         ("dullness to percussion at the right base", .3), ("oxygen saturation 92%", .5)),
        {"chest x-ray": "consolidation of the right lower lobe", "complete blood count":
         "white cells 15.8 x10^9/L with neutrophilia", "c-reactive protein": "CRP 180 mg/L",
         "pulse oximetry": "oxygen saturation 92% on room air", "blood cultures": ("no growth", "Streptococcus pneumoniae"),
         "influenza test": "negative", "covid-19 test": "negative"},
        ("acute bronchitis", "influenza", "covid-19", "pulmonary embolism")),
    Condition(
        "influenza", ("flu", "the flu", "influenza a", "influenza b"),
        {"fever": .9, "body_aches": .85, "dry_cough": .8, "headache": .7, "fatigue": .9, "chills": .7,
         "sore_throat": .5, "runny_nose": .4},
        "suddenly", (1 * D, 4 * D), (5, 85), .5,
        (("no flu vaccine this year", .7), ("someone at home has been ill", .5), ("works in a school", .2)),
        (("temperature 39.2 C", .9), ("looks unwell and flushed", .6), ("clear lungs", .8), ("red throat", .4)),
        {"influenza test": ("positive for influenza A", "positive for influenza A", "positive for influenza B"),
         "covid-19 test": "negative", "chest x-ray": "clear lungs",
         "complete blood count": "white cells 4.1 x10^9/L, mild lymphopenia"},
        ("covid-19", "common cold", "pneumonia", "infectious mononucleosis")),
    Condition(
        "covid-19", ("covid", "coronavirus disease 2019", "sars-cov-2 infection", "coronavirus infection"),
        {"fever": .7, "dry_cough": .7, "fatigue": .8, "loss_of_smell": .4, "body_aches": .5, "headache": .5,
         "sore_throat": .4, "shortness_of_breath": .3, "diarrhea": .15},
        "over a few days", (2 * D, 6 * D), (18, 85), .5,
        (("a household contact tested positive for COVID-19", .5), ("not up to date with vaccinations", .4),
         ("has high blood pressure", .2)),
        (("temperature 38.3 C", .7), ("clear lungs", .7), ("oxygen saturation 96%", .8)),
        {"covid-19 test": "positive for SARS-CoV-2", "influenza test": "negative",
         "chest x-ray": ("clear lungs", "patchy bilateral peripheral opacities"),
         "complete blood count": "white cells 4.5 x10^9/L, lymphopenia"},
        ("influenza", "common cold", "pneumonia", "acute bronchitis")),
    Condition(
        "streptococcal pharyngitis", ("strep throat", "strep pharyngitis", "bacterial pharyngitis",
                                      "streptococcal tonsillitis", "group a strep pharyngitis"),
        {"sore_throat": .98, "fever": .8, "swollen_glands": .7, "headache": .4, "abdominal_pain": .2,
         "nausea": .2, "loss_of_appetite": .4},
        "suddenly", (1 * D, 3 * D), (5, 40), .5,
        (("a classmate or colleague had strep throat", .4), ("no cough or cold symptoms", .7)),
        (("temperature 38.6 C", .8), ("swollen red tonsils with white exudate", .75),
         ("tender swollen lymph nodes at the front of the neck", .7), ("no cough", .9)),
        {"rapid strep test": ("positive for group A streptococcus", "positive for group A streptococcus", "negative"),
         "complete blood count": "white cells 14.0 x10^9/L", "monospot": "negative"},
        ("common cold", "infectious mononucleosis", "influenza")),
    Condition(
        "common cold", ("viral upper respiratory infection", "upper respiratory tract infection", "uri", "urti",
                        "viral uri", "coryza"),
        {"runny_nose": .9, "congestion": .85, "sore_throat": .6, "sneezing": .7, "cough": .5, "headache": .3,
         "fatigue": .4, "fever": .15},
        "gradually", (1 * D, 5 * D), (2, 80), .5,
        (("children at home with colds", .4), ("gets a few colds every winter", .6)),
        (("clear nasal discharge", .8), ("mildly red throat", .5), ("temperature 37.5 C", .3), ("clear lungs", .9)),
        {"rapid strep test": "negative", "influenza test": "negative", "covid-19 test": "negative"},
        ("influenza", "covid-19", "allergic rhinitis", "acute sinusitis")),
    Condition(
        "acute sinusitis", ("sinusitis", "rhinosinusitis", "acute rhinosinusitis", "sinus infection"),
        {"facial_pain": .9, "congestion": .9, "runny_nose": .7, "headache": .6, "fever": .3, "cough": .4,
         "loss_of_smell": .4, "fatigue": .4},
        "gradually", (7 * D, 21 * D), (18, 70), .55,
        (("had a cold two weeks ago that got better then worse", .6), ("has hay fever", .3)),
        (("tender over the cheekbones", .7), ("thick yellow-green nasal discharge", .7), ("temperature 37.9 C", .3)),
        {"c-reactive protein": "CRP 25 mg/L", "complete blood count": "white cells 10.5 x10^9/L"},
        ("common cold", "allergic rhinitis", "migraine", "tension headache")),
    Condition(
        "acute bronchitis", ("bronchitis", "chest cold"),
        {"cough": .98, "productive_cough": .6, "chest_tightness": .4, "wheezing": .3, "fatigue": .5,
         "sore_throat": .4, "fever": .2, "runny_nose": .3},
        "over a few days", (5 * D, 21 * D), (18, 80), .5,
        (("had a cold before the cough started", .6), ("smokes cigarettes", .25)),
        (("scattered wheeze", .3), ("normal breathing rate", .9), ("temperature 37.4 C", .3),
         ("no crackles", .9)),
        {"chest x-ray": "clear lungs", "c-reactive protein": "CRP 12 mg/L",
         "pulse oximetry": "oxygen saturation 97% on room air"},
        ("pneumonia", "asthma exacerbation", "covid-19", "common cold")),
    Condition(
        "infectious mononucleosis", ("mono", "glandular fever", "ebv infection", "epstein-barr virus infection"),
        {"sore_throat": .9, "fatigue": .95, "fever": .8, "swollen_glands": .9, "headache": .5,
         "loss_of_appetite": .5, "body_aches": .4, "rash": .1},
        "gradually", (4 * D, 14 * D), (15, 25), .5,
        (("a student", .7), ("a new partner recently", .4)),
        (("swollen lymph nodes at the back of the neck", .85), ("enlarged tonsils with exudate", .6),
         ("enlarged spleen", .4), ("temperature 38.4 C", .8)),
        {"monospot": "positive", "complete blood count": "white cells 13 x10^9/L with atypical lymphocytes",
         "liver function tests": "ALT 120 U/L, mildly raised", "rapid strep test": "negative"},
        ("streptococcal pharyngitis", "influenza", "common cold")),
    Condition(
        "allergic rhinitis", ("hay fever", "seasonal allergies", "allergies", "allergic rhinoconjunctivitis"),
        {"sneezing": .9, "runny_nose": .9, "congestion": .8, "itchy_eyes": .8, "cough": .2, "fatigue": .3},
        "gradually", (2 * W, 8 * W), (8, 60), .5,
        (("same symptoms every spring", .7), ("has eczema or asthma", .4), ("a cat at home", .2)),
        (("pale swollen nasal lining", .7), ("watery red eyes", .6), ("no fever", .95), ("dark circles under the eyes", .3)),
        {"allergy testing": "sensitised to grass and tree pollen",
         "complete blood count": "eosinophils 0.7 x10^9/L, mildly raised"},
        ("common cold", "acute sinusitis")),
    Condition(
        "migraine", ("migraine headache", "migraine with aura", "migraine without aura"),
        {"one_sided_headache": .85, "nausea": .75, "light_sensitivity": .85, "sound_sensitivity": .7,
         "vomiting": .35, "visual_aura": .25, "dizziness": .2},
        "gradually", (3 * H, 48 * H), (15, 55), .75,
        (("similar headaches before", .8), ("mother has migraines", .5), ("headaches around her period", .3),
         ("poor sleep lately", .4)),
        (("normal neurological examination", .95), ("prefers a dark room", .6), ("normal blood pressure", .9)),
        {"ct head": "normal", "complete blood count": "normal"},
        ("tension headache", "subarachnoid hemorrhage", "acute sinusitis", "bacterial meningitis")),
    Condition(
        "tension headache", ("tension-type headache", "tension type headache", "stress headache"),
        {"band_headache": .95, "fatigue": .3, "light_sensitivity": .1, "back_pain": .1},
        "gradually", (4 * H, 5 * D), (18, 65), .6,
        (("stressed at work", .6), ("long hours at a computer", .5), ("poor sleep", .4)),
        (("tender neck and shoulder muscles", .6), ("normal neurological examination", .98),
         ("normal blood pressure", .9)),
        {"ct head": "normal"},
        ("migraine", "acute sinusitis", "subarachnoid hemorrhage")),
    Condition(
        "subarachnoid hemorrhage", ("subarachnoid haemorrhage", "sah", "brain bleed", "ruptured aneurysm",
                                    "aneurysmal subarachnoid hemorrhage"),
        {"thunderclap_headache": .97, "vomiting": .7, "neck_stiffness": .6, "light_sensitivity": .5,
         "fainting": .3, "confusion": .3, "nausea": .7},
        "suddenly", (1 * H, 8 * H), (35, 70), .6,
        (("smokes cigarettes", .4), ("high blood pressure", .4), ("a relative had a brain aneurysm", .1)),
        (("neck stiffness", .6), ("blood pressure 180/100", .5), ("drowsy but rousable", .3),
         ("no focal weakness", .7)),
        {"ct head": "blood in the subarachnoid space around the circle of Willis",
         "lumbar puncture": "xanthochromia and raised red cells that do not clear", "ecg": "deep T-wave inversion"},
        ("migraine", "bacterial meningitis", "tension headache", "ischemic stroke")),
    Condition(
        "bacterial meningitis", ("meningitis", "meningococcal meningitis", "pneumococcal meningitis"),
        {"fever": .9, "headache": .9, "neck_stiffness": .8, "light_sensitivity": .6, "confusion": .6,
         "vomiting": .5, "rash": .2, "nausea": .5},
        "suddenly", (6 * H, 2 * D), (15, 70), .5,
        (("lives in a student hall", .3), ("had an ear infection", .2), ("no meningitis vaccine", .3)),
        (("temperature 39.5 C", .9), ("neck stiffness with pain on bending the neck", .8),
         ("drowsy and confused", .6), ("purple non-blanching spots on the legs", .2), ("heart rate 120", .7)),
        {"lumbar puncture": "cloudy CSF, 2,500 white cells (neutrophils), low glucose, high protein",
         "blood cultures": ("Neisseria meningitidis", "Streptococcus pneumoniae", "no growth"),
         "complete blood count": "white cells 22 x10^9/L", "c-reactive protein": "CRP 250 mg/L",
         "ct head": "normal", "lactate": "lactate 3.5 mmol/L"},
        ("subarachnoid hemorrhage", "influenza", "migraine")),
    Condition(
        "ischemic stroke", ("stroke", "ischaemic stroke", "cerebrovascular accident", "cva", "cerebral infarction"),
        {"one_sided_weakness": .9, "facial_droop": .7, "slurred_speech": .6, "numbness": .5, "confusion": .3,
         "dizziness": .3, "headache": .15},
        "suddenly", (1 * H, 6 * H), (55, 90), .45,
        (("high blood pressure", .7), ("atrial fibrillation", .25), ("smokes cigarettes", .3), ("diabetes", .3),
         ("high cholesterol", .5)),
        (("weakness of the right arm and leg", .8), ("right-sided facial droop", .7), ("difficulty finding words", .5),
         ("blood pressure 175/95", .7), ("irregularly irregular pulse", .2)),
        {"ct head": "no bleed; early loss of grey-white differentiation in the left middle cerebral artery territory",
         "mri brain": "acute infarct in the left middle cerebral artery territory on diffusion imaging",
         "blood glucose": "glucose 110 mg/dL", "ecg": ("normal sinus rhythm", "atrial fibrillation")},
        ("subarachnoid hemorrhage", "migraine", "benign paroxysmal positional vertigo")),
    Condition(
        "benign paroxysmal positional vertigo", ("bppv", "positional vertigo", "benign positional vertigo"),
        {"vertigo": .98, "nausea": .6, "vomiting": .2, "dizziness": .6},
        "suddenly", (1 * D, 10 * D), (40, 80), .65,
        (("first noticed it rolling over in bed", .7), ("a recent minor head bump", .1), ("had it once before", .3)),
        (("normal neurological examination", .95), ("normal hearing", .9), ("no nystagmus at rest", .9)),
        {"dix-hallpike test": "positive: torsional upbeating nystagmus with the right ear down",
         "mri brain": "normal"},
        ("ischemic stroke", "migraine")),
    Condition(
        "acute appendicitis", ("appendicitis",),
        {"periumbilical_pain": .6, "rlq_pain": .9, "loss_of_appetite": .85, "nausea": .75, "vomiting": .5,
         "fever": .4, "constipation": .1, "diarrhea": .1},
        "gradually", (12 * H, 36 * H), (10, 40), .45,
        (("no previous abdominal surgery", .9), ("otherwise healthy", .8)),
        (("tenderness at McBurney's point", .85), ("rebound tenderness in the right lower abdomen", .6),
         ("pain in the right lower abdomen when the left side is pressed", .4), ("temperature 37.9 C", .5)),
        {"complete blood count": "white cells 14.5 x10^9/L with neutrophilia", "c-reactive protein": "CRP 60 mg/L",
         "ct abdomen": "dilated, thick-walled appendix with surrounding fat stranding", "urinalysis": "normal",
         "abdominal ultrasound": "non-compressible appendix 9 mm across"},
        ("gastroenteritis", "kidney stone", "ectopic pregnancy", "urinary tract infection")),
    Condition(
        "acute cholecystitis", ("cholecystitis", "gallbladder inflammation", "gallbladder infection"),
        {"ruq_pain": .95, "nausea": .8, "vomiting": .6, "fever": .6, "pain_after_meals": .6, "loss_of_appetite": .5,
         "pain_to_back": .3},
        "gradually", (6 * H, 3 * D), (35, 75), .7,
        (("had gallstone pain before", .5), ("overweight", .6), ("a large fatty meal last night", .5)),
        (("Murphy's sign: catches breath when the right upper abdomen is pressed", .8),
         ("tender right upper abdomen", .9), ("temperature 38.2 C", .6)),
        {"abdominal ultrasound": "gallstones, thickened gallbladder wall and fluid around the gallbladder",
         "complete blood count": "white cells 13.5 x10^9/L", "liver function tests":
         "alkaline phosphatase mildly raised, bilirubin normal", "lipase": "normal", "c-reactive protein": "CRP 90 mg/L"},
        ("acute pancreatitis", "peptic ulcer disease", "pyelonephritis", "myocardial infarction")),
    Condition(
        "acute pancreatitis", ("pancreatitis",),
        {"epigastric_pain": .95, "pain_to_back": .6, "nausea": .85, "vomiting": .75, "fever": .3,
         "loss_of_appetite": .6},
        "suddenly", (4 * H, 2 * D), (30, 70), .4,
        (("drinks heavily", .4), ("gallstones", .4), ("high triglycerides", .1)),
        (("tender upper abdomen with guarding", .85), ("heart rate 110", .6), ("leans forward for relief", .4),
         ("temperature 37.9 C", .3)),
        {"lipase": "lipase 1,450 U/L (more than three times normal)",
         "ct abdomen": "swollen pancreas with surrounding inflammation",
         "complete blood count": "white cells 14 x10^9/L", "liver function tests": ("normal", "ALT 250 U/L"),
         "abdominal ultrasound": ("gallstones", "normal gallbladder")},
        ("acute cholecystitis", "peptic ulcer disease", "myocardial infarction")),
    Condition(
        "gastroenteritis", ("viral gastroenteritis", "stomach flu", "stomach bug", "food poisoning",
                            "infectious gastroenteritis"),
        {"diarrhea": .95, "vomiting": .7, "nausea": .8, "abdominal_pain": .6, "fever": .4, "body_aches": .3,
         "loss_of_appetite": .6},
        "suddenly", (6 * H, 3 * D), (2, 85), .5,
        (("others at home have the same", .4), ("ate at a buffet", .3), ("recent travel", .2)),
        (("mildly tender abdomen all over", .6), ("dry mouth", .5), ("active bowel sounds", .7),
         ("temperature 37.8 C", .4)),
        {"stool studies": ("norovirus detected", "no pathogens detected", "Campylobacter jejuni"),
         "basic metabolic panel": "potassium 3.3, creatinine slightly raised (dehydration)",
         "complete blood count": "normal"},
        ("acute appendicitis", "diverticulitis", "covid-19")),
    Condition(
        "diverticulitis", ("acute diverticulitis", "sigmoid diverticulitis"),
        {"llq_pain": .9, "fever": .6, "nausea": .5, "constipation": .4, "diarrhea": .3, "loss_of_appetite": .5,
         "bloating": .3},
        "gradually", (1 * D, 4 * D), (50, 85), .5,
        (("known diverticular disease", .5), ("low-fibre diet", .4), ("overweight", .4)),
        (("tender left lower abdomen", .9), ("temperature 38.1 C", .6), ("localised guarding in the left lower abdomen", .4)),
        {"ct abdomen": "inflamed sigmoid colon with diverticula and fat stranding",
         "complete blood count": "white cells 13 x10^9/L", "c-reactive protein": "CRP 110 mg/L",
         "urinalysis": "normal"},
        ("gastroenteritis", "kidney stone", "acute appendicitis")),
    Condition(
        "gastroesophageal reflux disease", ("gerd", "gord", "acid reflux", "reflux", "reflux disease",
                                            "gastro-oesophageal reflux disease"),
        {"heartburn": .95, "epigastric_pain": .3, "dry_cough": .2, "hoarse_voice": .15, "nausea": .2,
         "chest_pain": .2, "bloating": .3},
        "gradually", (3 * W, 6 * 4 * W), (25, 75), .5,
        (("worse after large meals and lying down", .8), ("overweight", .5), ("drinks coffee and alcohol", .5),
         ("smokes", .2)),
        (("normal examination", .9), ("mild upper abdominal tenderness", .2)),
        {"upper endoscopy": ("mild reflux oesophagitis", "normal"), "ecg": "normal sinus rhythm",
         "troponin": "normal", "h. pylori test": "negative"},
        ("peptic ulcer disease", "stable angina", "myocardial infarction")),
    Condition(
        "peptic ulcer disease", ("peptic ulcer", "stomach ulcer", "gastric ulcer", "duodenal ulcer", "ulcer"),
        {"epigastric_pain": .9, "nausea": .5, "bloating": .4, "loss_of_appetite": .3, "black_stool": .2,
         "vomiting": .2, "weight_loss": .1},
        "gradually", (2 * W, 8 * W), (30, 80), .45,
        (("takes ibuprofen for back pain", .5), ("smokes", .3), ("drinks alcohol", .3)),
        (("tender upper middle abdomen", .8), ("pale", .15)),
        {"h. pylori test": ("positive", "positive", "negative"),
         "upper endoscopy": "ulcer in the duodenum", "complete blood count":
         ("normal", "hemoglobin 10.8 g/dL"), "lipase": "normal"},
        ("gastroesophageal reflux disease", "acute pancreatitis", "acute cholecystitis")),
    Condition(
        "urinary tract infection", ("uti", "cystitis", "bladder infection", "lower urinary tract infection",
                                    "acute cystitis"),
        {"painful_urination": .95, "frequent_urination": .9, "urgency": .8, "pelvic_pain": .5, "blood_in_urine": .2,
         "fever": .05},
        "over a few days", (1 * D, 4 * D), (16, 80), .85,
        (("has had bladder infections before", .4), ("sexually active", .5), ("post-menopausal", .2)),
        (("tender above the pubic bone", .5), ("no flank tenderness", .9), ("temperature 37.2 C", .9)),
        {"urinalysis": "positive for leukocytes and nitrites", "urine culture": "Escherichia coli > 10^5 CFU/mL",
         "complete blood count": "normal"},
        ("pyelonephritis", "kidney stone", "ectopic pregnancy")),
    Condition(
        "pyelonephritis", ("kidney infection", "acute pyelonephritis", "upper urinary tract infection"),
        {"fever": .9, "flank_pain": .9, "chills": .7, "nausea": .6, "vomiting": .4, "painful_urination": .6,
         "frequent_urination": .5, "fatigue": .5},
        "over a few days", (1 * D, 4 * D), (18, 70), .8,
        (("had a bladder infection last week", .4), ("diabetes", .2)),
        (("temperature 39.0 C", .9), ("tender at the right costovertebral angle", .85), ("heart rate 105", .5)),
        {"urinalysis": "leukocytes, nitrites and white cell casts", "urine culture": "Escherichia coli > 10^5 CFU/mL",
         "complete blood count": "white cells 16 x10^9/L", "c-reactive protein": "CRP 150 mg/L",
         "blood cultures": ("no growth", "Escherichia coli"), "ct kidneys": "no stones"},
        ("urinary tract infection", "kidney stone", "acute appendicitis", "acute cholecystitis")),
    Condition(
        "kidney stone", ("nephrolithiasis", "renal colic", "urolithiasis", "kidney stones", "ureteric stone",
                         "renal calculus"),
        {"flank_pain": .95, "colicky_pain": .85, "nausea": .6, "vomiting": .4, "blood_in_urine": .3,
         "pelvic_pain": .3, "frequent_urination": .2},
        "suddenly", (1 * H, 12 * H), (25, 65), .35,
        (("had a kidney stone before", .4), ("drinks little water", .5), ("hot weather lately", .3)),
        (("restless, cannot lie still", .8), ("tender in the left flank", .7), ("no fever", .9)),
        {"urinalysis": "blood ++, no nitrites", "ct kidneys": "5 mm stone in the left ureter with mild hydronephrosis",
         "basic metabolic panel": "normal", "complete blood count": "normal"},
        ("pyelonephritis", "acute appendicitis", "diverticulitis")),
    Condition(
        "myocardial infarction", ("heart attack", "mi", "acute myocardial infarction", "acute coronary syndrome",
                                  "stemi", "nstemi", "ami"),
        {"pressure_chest_pain": .9, "radiating_arm_pain": .5, "sweating": .6, "shortness_of_breath": .5,
         "nausea": .4, "dizziness": .2, "fatigue": .3},
        "suddenly", (1 * H, 6 * H), (45, 85), .35,
        (("smokes cigarettes", .4), ("high cholesterol", .5), ("high blood pressure", .6), ("diabetes", .3),
         ("father had a heart attack at 55", .3)),
        (("pale and sweaty", .6), ("heart rate 100", .5), ("blood pressure 150/90", .5), ("normal heart sounds", .7)),
        {"ecg": ("ST elevation in leads II, III and aVF", "ST depression in V4-V6"),
         "troponin": "high-sensitivity troponin 2,400 ng/L (markedly raised)", "chest x-ray": "normal",
         "d-dimer": "normal"},
        ("stable angina", "pulmonary embolism", "gastroesophageal reflux disease", "acute pericarditis", "panic attack")),
    Condition(
        "stable angina", ("angina", "angina pectoris", "stable angina pectoris", "exertional angina"),
        {"exertional_chest_pain": .95, "shortness_of_breath": .4, "radiating_arm_pain": .3, "fatigue": .2},
        "gradually", (2 * W, 12 * W), (45, 80), .4,
        (("smokes cigarettes", .4), ("high cholesterol", .6), ("high blood pressure", .6), ("diabetes", .3)),
        (("normal examination at rest", .9), ("blood pressure 145/90", .5)),
        {"ecg": "normal at rest", "troponin": "normal", "echocardiogram": "normal",
         "complete blood count": "normal"},
        ("myocardial infarction", "gastroesophageal reflux disease", "costochondritis")),
    Condition(
        "pulmonary embolism", ("pe", "pulmonary embolus", "lung clot", "blood clot in the lung"),
        {"shortness_of_breath": .85, "pleuritic_chest_pain": .6, "cough": .2, "coughing_blood": .1,
         "one_leg_swelling": .3, "palpitations": .3, "fainting": .1, "dizziness": .2},
        "suddenly", (2 * H, 2 * D), (25, 85), .55,
        (("a long flight last week", .3), ("had surgery a month ago", .2), ("takes the contraceptive pill", .2),
         ("had a blood clot before", .15), ("has cancer", .1)),
        (("breathing 26 times a minute", .7), ("heart rate 115", .7), ("oxygen saturation 91%", .6),
         ("clear lungs", .7), ("swollen tender calf", .3)),
        {"ct pulmonary angiogram": "filling defects in the right and left lower lobe pulmonary arteries",
         "d-dimer": "D-dimer 3.2 mg/L FEU (raised)", "ecg": ("sinus tachycardia", "sinus tachycardia with S1Q3T3"),
         "chest x-ray": "clear lungs", "troponin": ("normal", "mildly raised"),
         "pulse oximetry": "oxygen saturation 91% on room air", "blood gas": "pO2 62 mmHg, pCO2 32 mmHg"},
        ("pneumonia", "myocardial infarction", "panic attack", "spontaneous pneumothorax")),
    Condition(
        "asthma exacerbation", ("asthma attack", "acute asthma", "asthma flare", "exacerbation of asthma",
                                "acute asthma exacerbation"),
        {"wheezing": .9, "shortness_of_breath": .95, "chest_tightness": .8, "dry_cough": .7},
        "over a few days", (6 * H, 3 * D), (5, 50), .55,
        (("known asthma", .95), ("ran out of the preventer inhaler", .4), ("had a cold", .4), ("a cat at a friend's", .2)),
        (("widespread wheeze", .9), ("breathing 26 times a minute", .7), ("speaks in short sentences", .4),
         ("oxygen saturation 94%", .6)),
        {"peak flow": "peak flow 50% of predicted", "pulse oximetry": "oxygen saturation 94% on room air",
         "chest x-ray": "hyperinflated lungs, no consolidation", "blood gas": "pCO2 34 mmHg"},
        ("copd exacerbation", "acute bronchitis", "anaphylaxis", "panic attack")),
    Condition(
        "copd exacerbation", ("acute exacerbation of copd", "aecopd", "copd flare", "chronic obstructive pulmonary "
                              "disease exacerbation", "exacerbation of copd"),
        {"shortness_of_breath": .95, "productive_cough": .85, "wheezing": .7, "chest_tightness": .4, "fatigue": .5,
         "fever": .2},
        "over a few days", (2 * D, 7 * D), (50, 85), .45,
        (("smoked for 40 years", .9), ("known COPD on inhalers", .9), ("had a cold last week", .4)),
        (("wheeze and quiet breath sounds", .8), ("pursed-lip breathing", .5), ("oxygen saturation 88%", .6),
         ("barrel chest", .5)),
        {"blood gas": "pH 7.33, pCO2 55 mmHg", "chest x-ray": "hyperinflated lungs, no consolidation",
         "pulse oximetry": "oxygen saturation 88% on room air", "complete blood count": "white cells 11 x10^9/L",
         "spirometry": "FEV1/FVC 0.55"},
        ("pneumonia", "congestive heart failure", "asthma exacerbation", "pulmonary embolism")),
    Condition(
        "congestive heart failure", ("heart failure", "chf", "acute decompensated heart failure",
                                     "decompensated heart failure", "cardiac failure"),
        {"shortness_of_breath": .95, "orthopnea": .7, "leg_swelling": .8, "fatigue": .7, "cough": .3,
         "weight_gain": .5},
        "gradually", (3 * D, 3 * W), (55, 90), .45,
        (("had a heart attack before", .5), ("high blood pressure", .7), ("stopped taking water tablets", .3)),
        (("crackles at both lung bases", .8), ("pitting ankle oedema", .8), ("raised jugular venous pressure", .6),
         ("third heart sound", .3), ("oxygen saturation 93%", .5)),
        {"bnp": "NT-proBNP 4,800 pg/mL (markedly raised)",
         "chest x-ray": "enlarged heart, upper lobe diversion and small pleural effusions",
         "echocardiogram": "ejection fraction 30%", "ecg": "old Q waves, no acute changes", "troponin": "normal"},
        ("copd exacerbation", "pneumonia", "pulmonary embolism")),
    Condition(
        "deep vein thrombosis", ("dvt", "deep venous thrombosis", "blood clot in the leg", "leg clot"),
        {"one_leg_swelling": .9, "skin_redness": .3, "leg_swelling": .9},
        "gradually", (1 * D, 7 * D), (25, 85), .55,
        (("recently had surgery", .3), ("a long flight or car journey", .3), ("takes the contraceptive pill", .2),
         ("had a clot before", .15), ("has cancer", .1)),
        (("left calf 3 cm larger than the right", .8), ("pitting oedema of the left leg", .6),
         ("tender along the deep veins", .6), ("warm left calf", .4)),
        {"leg ultrasound": "non-compressible left popliteal and femoral veins with thrombus",
         "d-dimer": "D-dimer 2.1 mg/L FEU (raised)", "complete blood count": "normal"},
        ("cellulitis", "congestive heart failure", "gout")),
    Condition(
        "cellulitis", ("skin infection", "bacterial skin infection", "erysipelas"),
        {"skin_redness": .98, "skin_pain": .8, "fever": .4, "chills": .3, "leg_swelling": .5, "fatigue": .3},
        "over a few days", (1 * D, 4 * D), (20, 85), .5,
        (("a cut or insect bite on the leg", .5), ("athlete's foot", .3), ("diabetes", .2), ("overweight", .3)),
        (("spreading red, warm, tender area on the lower leg", .95), ("temperature 38.0 C", .4),
         ("poorly demarcated edges", .7)),
        {"complete blood count": "white cells 12.5 x10^9/L", "c-reactive protein": "CRP 85 mg/L",
         "leg ultrasound": "no deep vein thrombosis", "blood cultures": "no growth"},
        ("deep vein thrombosis", "gout", "herpes zoster")),
    Condition(
        "gout", ("acute gout", "gouty arthritis", "podagra", "gout flare", "gout attack"),
        {"joint_swelling": .95, "joint_pain": .98, "skin_redness": .5, "fever": .1},
        "suddenly", (6 * H, 2 * D), (35, 80), .15,
        (("drinks beer", .5), ("takes a water tablet", .3), ("a big meal with red meat", .3), ("had it before", .5)),
        (("red, hot, swollen big toe joint", .8), ("exquisitely tender joint", .9), ("temperature 37.5 C", .2)),
        {"joint aspiration": "needle-shaped negatively birefringent urate crystals, no organisms",
         "uric acid": ("urate 9.5 mg/dL (raised)", "urate 6.5 mg/dL"),
         "c-reactive protein": "CRP 40 mg/L", "complete blood count": "white cells 11 x10^9/L"},
        ("cellulitis", "deep vein thrombosis")),
    Condition(
        "atrial fibrillation", ("af", "afib", "a-fib", "fast atrial fibrillation", "atrial fibrillation with rapid "
                                "ventricular response"),
        {"palpitations": .85, "shortness_of_breath": .5, "dizziness": .4, "fatigue": .6, "chest_pain": .2,
         "anxiety": .3},
        "suddenly", (2 * H, 3 * D), (55, 90), .45,
        (("high blood pressure", .6), ("drinks alcohol most days", .3), ("overactive thyroid", .05)),
        (("irregularly irregular pulse of 135", .9), ("blood pressure 130/80", .6), ("no murmur", .8)),
        {"ecg": "atrial fibrillation at 135 beats per minute", "tsh": "normal",
         "echocardiogram": "enlarged left atrium, normal ventricular function", "troponin": "normal"},
        ("panic attack", "myocardial infarction", "hypothyroidism")),
    Condition(
        "acute pericarditis", ("pericarditis", "viral pericarditis"),
        {"pleuritic_chest_pain": .9, "fever": .4, "shortness_of_breath": .3, "fatigue": .3, "body_aches": .2},
        "over a few days", (6 * H, 3 * D), (18, 55), .35,
        (("had a cold recently", .5), ("the pain eases when leaning forward", .8)),
        (("pericardial friction rub", .6), ("temperature 37.9 C", .4), ("worse lying flat", .7)),
        {"ecg": "widespread concave ST elevation with PR depression", "troponin": ("normal", "mildly raised"),
         "echocardiogram": "small pericardial effusion", "c-reactive protein": "CRP 70 mg/L",
         "chest x-ray": "normal"},
        ("myocardial infarction", "pulmonary embolism", "costochondritis")),
    Condition(
        "spontaneous pneumothorax", ("pneumothorax", "collapsed lung", "primary spontaneous pneumothorax"),
        {"pleuritic_chest_pain": .9, "shortness_of_breath": .85, "dry_cough": .1, "palpitations": .2},
        "suddenly", (1 * H, 2 * D), (16, 40), .2,
        (("tall and thin", .6), ("smokes", .5), ("had a collapsed lung before", .2)),
        (("reduced breath sounds on the right", .85), ("hyper-resonant right chest", .5), ("heart rate 105", .5),
         ("oxygen saturation 94%", .4)),
        {"chest x-ray": "right-sided pneumothorax with a 3 cm rim", "pulse oximetry": "oxygen saturation 94% on room air",
         "ecg": "sinus tachycardia"},
        ("pulmonary embolism", "acute pericarditis", "costochondritis", "asthma exacerbation")),
    Condition(
        "panic attack", ("panic disorder", "anxiety attack"),
        {"palpitations": .9, "anxiety": .9, "shortness_of_breath": .7, "trembling": .6, "tingling_hands": .5,
         "chest_tightness": .5, "sweating": .5, "dizziness": .5},
        "suddenly", (1 * H, 3 * H), (16, 45), .65,
        (("similar episodes before", .6), ("under a lot of stress", .7), ("drinks a lot of coffee", .3)),
        (("anxious, breathing fast", .8), ("heart rate 110, regular", .7), ("normal heart and lung examination", .95)),
        {"ecg": "sinus tachycardia", "troponin": "normal", "tsh": "normal", "d-dimer": "normal",
         "blood glucose": "normal", "blood gas": "pCO2 30 mmHg (over-breathing)"},
        ("myocardial infarction", "atrial fibrillation", "pulmonary embolism", "asthma exacerbation")),
    Condition(
        "diabetic ketoacidosis", ("dka", "ketoacidosis"),
        {"excessive_thirst": .9, "frequent_urination": .9, "vomiting": .7, "abdominal_pain": .5, "fatigue": .8,
         "confusion": .3, "weight_loss": .5, "shortness_of_breath": .3, "nausea": .7},
        "over a few days", (1 * D, 4 * D), (10, 40), .5,
        (("type 1 diabetes", .7), ("missed insulin doses", .5), ("a recent infection", .3)),
        (("deep sighing breaths", .7), ("fruity smell on the breath", .5), ("dry mouth, heart rate 120", .8),
         ("drowsy", .3)),
        {"blood glucose": "glucose 480 mg/dL", "ketones": "beta-hydroxybutyrate 5.5 mmol/L",
         "blood gas": "pH 7.12, bicarbonate 9", "basic metabolic panel": "bicarbonate 9, anion gap 26, potassium 5.6",
         "urinalysis": "glucose +++, ketones +++"},
        ("gastroenteritis", "acute appendicitis", "acute pancreatitis")),
    Condition(
        "iron deficiency anemia", ("iron deficiency anaemia", "anemia", "anaemia", "iron deficiency"),
        {"fatigue": .95, "shortness_of_breath": .5, "dizziness": .4, "pale_skin": .6, "palpitations": .3,
         "headache": .3, "cold_intolerance": .2},
        "gradually", (4 * W, 16 * W), (18, 80), .75,
        (("heavy periods", .5), ("vegetarian diet", .3), ("takes aspirin", .1)),
        (("pale conjunctivae", .7), ("heart rate 95", .4), ("brittle spoon-shaped nails", .1),
         ("soft flow murmur", .2)),
        {"complete blood count": "hemoglobin 8.9 g/dL, MCV 71 fL (small red cells)",
         "iron studies": "ferritin 6 ng/mL (low)", "tsh": "normal"},
        ("hypothyroidism", "congestive heart failure")),
    Condition(
        "hypothyroidism", ("underactive thyroid", "hashimoto's thyroiditis", "hashimoto thyroiditis",
                           "low thyroid"),
        {"fatigue": .9, "weight_gain": .6, "cold_intolerance": .6, "constipation": .5, "dry_skin": .6,
         "depressed_mood": .4, "hoarse_voice": .1},
        "gradually", (8 * W, 24 * W), (30, 80), .8,
        (("mother has a thyroid problem", .4), ("has another autoimmune condition", .2)),
        (("dry coarse skin", .5), ("slow pulse of 56", .4), ("slow-relaxing ankle reflexes", .4),
         ("puffy face", .3)),
        {"tsh": "TSH 18 mIU/L (high), free T4 low", "complete blood count": "hemoglobin 12 g/dL",
         "iron studies": "normal"},
        ("iron deficiency anemia", "depression")),
    Condition(
        "sciatica", ("lumbar radiculopathy", "sciatic nerve pain", "herniated disc", "slipped disc",
                     "lumbar disc herniation"),
        {"sciatic_pain": .95, "back_pain": .9, "numbness": .5},
        "suddenly", (2 * D, 3 * W), (30, 60), .45,
        (("lifted something heavy", .5), ("desk job", .4), ("had back pain before", .5)),
        (("straight leg raise positive on the left at 40 degrees", .8), ("reduced left ankle reflex", .4),
         ("normal bladder and bowel control", .95)),
        {"mri lumbar spine": "L5/S1 disc herniation compressing the left S1 nerve root"},
        ("kidney stone", "deep vein thrombosis")),
    Condition(
        "herpes zoster", ("shingles", "zoster"),
        {"blistering_rash": .95, "skin_pain": .9, "fever": .2, "fatigue": .4, "headache": .2},
        "over a few days", (2 * D, 5 * D), (50, 90), .55,
        (("had chickenpox as a child", .9), ("not vaccinated against shingles", .7), ("under stress", .3)),
        (("clusters of blisters on a red base in a band on one side of the chest", .9),
         ("rash stops at the midline", .85)),
        {"vzv pcr": "varicella-zoster virus detected"},
        ("cellulitis", "costochondritis", "myocardial infarction")),
    Condition(
        "ectopic pregnancy", ("tubal pregnancy", "ruptured ectopic pregnancy", "extrauterine pregnancy"),
        {"pelvic_pain": .95, "missed_period": .8, "vaginal_bleeding": .7, "dizziness": .3, "fainting": .1,
         "nausea": .3},
        "suddenly", (3 * H, 2 * D), (18, 42), 1.0,
        (("had a pelvic infection before", .3), ("has an IUD", .1), ("previous ectopic pregnancy", .1)),
        (("tender right lower abdomen", .8), ("tender adnexa on pelvic examination", .7), ("heart rate 100", .4)),
        {"pregnancy test": "positive; serum beta-hCG 2,200 mIU/mL",
         "pelvic ultrasound": "empty uterus with a right adnexal mass and free fluid",
         "complete blood count": "hemoglobin 11 g/dL", "urinalysis": "normal"},
        ("acute appendicitis", "urinary tract infection", "kidney stone")),
    Condition(
        "costochondritis", ("chest wall pain", "musculoskeletal chest pain", "tietze syndrome"),
        {"chest_pain": .98, "pleuritic_chest_pain": .4},
        "gradually", (2 * D, 3 * W), (18, 60), .6,
        (("started a new gym routine", .3), ("a recent coughing illness", .3)),
        (("pain reproduced by pressing on the rib joints beside the breastbone", .9),
         ("normal heart and lung examination", .95)),
        {"ecg": "normal sinus rhythm", "troponin": "normal", "chest x-ray": "normal", "d-dimer": "normal"},
        ("myocardial infarction", "acute pericarditis", "stable angina")),
    Condition(
        "anaphylaxis", ("anaphylactic reaction", "severe allergic reaction", "anaphylactic shock"),
        {"hives": .9, "lip_swelling": .7, "shortness_of_breath": .7, "wheezing": .5, "dizziness": .4,
         "vomiting": .3, "abdominal_pain": .2, "anxiety": .4},
        "suddenly", (1 * H, 2 * H), (5, 70), .5,
        (("ate peanuts at a restaurant", .4), ("a bee sting", .2), ("a new antibiotic", .2), ("known allergies", .5)),
        (("widespread hives", .9), ("swollen lips", .6), ("blood pressure 85/50", .5), ("wheeze", .5)),
        {"pulse oximetry": "oxygen saturation 93% on room air", "ecg": "sinus tachycardia",
         "complete blood count": "normal"},
        ("asthma exacerbation", "panic attack")),
    Condition(
        "depression", ("major depressive disorder", "clinical depression", "major depression"),
        {"depressed_mood": .95, "fatigue": .85, "loss_of_appetite": .5, "weight_loss": .3, "anxiety": .4,
         "headache": .2},
        "gradually", (3 * W, 16 * W), (18, 75), .65,
        (("stopped enjoying hobbies", .8), ("sleeping badly", .7), ("a recent loss or stress", .5)),
        (("flat affect", .7), ("normal physical examination", .95)),
        {"tsh": "normal", "complete blood count": "normal"},
        ("hypothyroidism", "iron deficiency anemia")),
]

CONDITIONS: dict[str, Condition] = {c.name: c for c in CONDITIONS_LIST}


def _check_table() -> None:
    names: dict[str, str] = {}
    for c in CONDITIONS_LIST:
        for n in c.names:
            if n.lower() in names:
                raise ValueError(f"condition name {n!r} of {c.name!r} is already used by {names[n.lower()]!r}")
            names[n.lower()] = c.name
        for k, f in c.symptoms.items():
            if k not in SYMPTOMS:
                raise ValueError(f"{c.name}: unknown symptom {k!r}; add it to lexicon.SYMPTOMS")
            if not 0 < f <= 1:
                raise ValueError(f"{c.name}: frequency of {k!r} is {f}, expected (0, 1]")
        for t in c.tests:
            if t not in TESTS:
                raise ValueError(f"{c.name}: unknown test {t!r}; add it to lexicon.TESTS")
        for d in c.distractors:
            if d not in {x.name for x in CONDITIONS_LIST}:
                raise ValueError(f"{c.name}: distractor {d!r} is not a condition in the table")
        if not (0 <= c.female <= 1 and 0 <= c.age[0] <= c.age[1] and 0 < c.onset_hours[0] <= c.onset_hours[1]):
            raise ValueError(f"{c.name}: bad female fraction {c.female}, age {c.age} or onset {c.onset_hours}")


_check_table()
