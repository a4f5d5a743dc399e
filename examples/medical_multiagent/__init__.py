"""Doctor and patient agents trained together by RL on diagnostic dialogues: cases, patient, rewards, doctor env."""
