"""The `vsalmonn-jax demo` main job: synthetic AV data -> tiny pretrained parts -> align -> SFT ->
mrDPO rounds (+ a control arm) -> rebirth, captioned and scored after every stage, with a report."""
