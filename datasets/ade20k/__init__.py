"""ADE20K (SceneParsing, ADEChallengeData2016) TFDS builder."""
