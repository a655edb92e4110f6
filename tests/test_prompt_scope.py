"""What a free-text prompt asks for, what it only mentions, and what it excludes
(clopdit_dist/data/prompt_scope.py; the resolver's use of it is tested in test_conditions.py)."""

from clopdit_dist.data.prompt_scope import read_scope


def test_a_plain_prompt_is_read_as_it_is():
    for text in ("CD8 T cells from a lung tumour", "I'd like to generate helper T cells from blood",
                 "B cells and plasma cells from lymph node"):
        s = read_scope(text)
        assert not s.split and s.asked == text and not s.excluded


def test_the_request_sentence_is_asked_and_the_story_around_it_is_not():
    s = read_scope("We already have plenty of ciliated cells from nasal swabs. What I need now are the "
                   "surfactant-secreting cells of the alveoli, so I can compare them with the macrophages we sequenced.")
    assert "surfactant-secreting cells of the alveoli" in s.asked
    assert "macrophages" not in s.asked + s.context and "ciliated" not in s.asked + s.context
    assert "macrophages" in s.asides and "ciliated cells from nasal swabs" in s.asides
    # a sentence with no request in a prompt that has one is context, read for what the request leaves out
    s = read_scope("For a Crohn's project. Please simulate the absorptive cells lining the colon")
    assert s.asked == "Please simulate the absorptive cells lining the colon" and s.context == "For a Crohn's project."
    # outside a request the whole clause of a plan is an aside, the names before its verb included
    s = read_scope("Please generate the main cell of the epidermis; the melanocytes we'll take from a public atlas")
    assert "melanocytes" in s.asides and "melanocytes" not in s.asked + s.context
    # inside a request only what follows the cue
    s = read_scope("I want the bile duct cells from NAFLD livers, to compare against the hepatocytes in our atlas")
    assert "bile duct cells from NAFLD livers" in s.asked and "hepatocytes" in s.asides


def test_a_comparison_is_an_aside_from_its_cue_on():
    s = read_scope("Are type I pneumocytes depleted in LUAD compared with normal lung? Generate both so I can check.")
    assert "type I pneumocytes depleted in LUAD" in s.context and "normal lung" in s.asides


def test_a_field_said_unspecified_is_left_open():
    from clopdit_dist.data.prompt_scope import open_fields
    assert open_fields("Keratinocytes from skin. No disease condition was specified, so I left it open.") == {"disease"}
    assert open_fields("tissue not specified; unspecified disease") == {"tissue_general", "disease"}
    assert open_fields("the disease was given as psoriasis") == set()  # said, not left open


def test_a_studys_design_is_an_aside():
    s = read_scope("We are simulating a cohort for an NAFLD vs control comparison. This call is the control arm only: "
                   "2k hepatocytes from healthy livers")
    assert "NAFLD" in s.asides and "NAFLD" not in s.asked + s.context and "healthy livers" in s.asked + s.context
    s = read_scope("For our non-lesional vs healthy comparison we need melanocytes from psoriasis patients")
    assert s.asked == "For our we need melanocytes from psoriasis patients"


def test_what_a_relative_clause_says_the_cells_act_on_is_an_aside():
    s = read_scope("CLEC9A+ XCR1+ antigen-presenting cells that cross-present to naive CD8 T cells, from a lymph node")
    assert "CD8" not in s.asked and "naive CD8 T cells" in s.asides
    assert "antigen-presenting cells that cross-present" in s.asked and "from a lymph node" in s.asked
    # the verb stays: it may be what describes the cells asked for
    s = read_scope("cells that kill virus-infected cells in COVID-19 lung")
    assert s.asked == "cells that kill" and "COVID-19 lung" in s.asides
    assert read_scope("macrophages which engulf neutrophils").asked == "macrophages which engulf"


def test_negations_exclude_up_to_their_clause_or_preposition():
    s = read_scope("dendritic cells from healthy blood, but not the plasmacytoid type")
    assert s.excluded == ["the plasmacytoid type"] and "plasmacytoid" not in s.asked
    assert "dendritic cells from healthy blood" in s.asked
    s = read_scope("T cells from lymph node that are neither CD8 nor Tregs")
    assert "CD8" in " ".join(s.excluded) and "Tregs" in " ".join(s.excluded) and "CD8" not in s.asked
    s = read_scope("Lung epithelial cells that aren't airway cells from normal lung")
    assert s.excluded == ["airway cells"] and "from normal lung" in s.asked


def test_an_exclusions_quantifier_and_verbs_are_part_of_it():
    # session 33 (resolver_dev_s33a.yaml): "any kind of" ended the scope at its "of"; "drop" excluded nothing
    s = read_scope("all myeloid cells except any kind of macrophage, from COVID-19 lungs")
    assert s.excluded == ["any kind of macrophage"] and "macrophage" not in s.asked
    s = read_scope("Lymphocytes minus the whole B lineage (drop plasma cells too) from lupus blood.")
    assert s.excluded == ["the whole B lineage", "plasma cells too"] and "plasma" not in s.asked
    assert not read_scope("T cells profiled with Drop-seq").excluded  # an assay, no verb


def test_a_keep_clause_keeps_its_cells_in_and_asks_for_nothing_new():
    s = read_scope("Every immune cell in COVID-19 BAL except T cells and B cells. Keep the plasma cells.")
    assert s.kept == ["the plasma cells"] and "plasma" not in s.asked and s.excluded == ["T cells and B cells"]


def test_a_pasted_chats_user_turns_and_fields_left_open():
    from clopdit_dist.data.prompt_scope import user_turns

    chat = ("User: Generate alveolar macrophages from COVID-19 lungs.\nAssistant: Done, 800 alveolar macrophages.\n"
            "User: And the matching blood monocytes from the same patients.")
    assert user_turns(chat) == ["Generate alveolar macrophages from COVID-19 lungs.",
                                "And the matching blood monocytes from the same patients."]
    assert user_turns("cell type: B cell; tissue: lung") is None and user_turns("User: B cells") is None
    # "no particular organ or condition" leaves both open, in the asked parts only
    s = read_scope("Forget the lymph node. I just want Tregs, no particular organ or condition.")
    assert s.held_open == {"tissue_general", "disease"} and s.excluded == ["the lymph node"]
    assert not read_scope("Please generate Tregs. Last time we had no particular organ in mind.").held_open


def test_non_x_is_a_negation_unless_it_begins_a_name():
    names = {"non-classical", "non-alcoholic"}
    s = read_scope("non-classical monocytes from non-alcoholic fatty liver", lambda w: w.lower() in names)
    assert not s.split and not s.excluded
    s = read_scope("Non-ciliated airway epithelial cells from the lungs", lambda w: w.lower() in names)
    assert s.excluded == ["ciliated cells"] and "ciliated" not in s.asked.lower()
    assert not read_scope("B cells from blood, none from COVID-19 donors, nonetheless healthy").excluded


def test_a_field_left_open_on_purpose_is_taken_out():
    s = read_scope("covid-19 samples, any tissue, whatever cell type")
    assert s.split and "tissue" not in s.asked and "cell type" not in s.asked and "covid-19 samples" in s.asked
