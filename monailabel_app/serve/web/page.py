"""The reading page: a Gradio page at ``/reader/`` on MONAI Label's own server.

One request's path: 分析 (``analyse``) -> the study (an upload or a datastore id) -> the server's queue
(:data:`guards.QUEUE`, shared with ``/infer``) -> the infer task's :meth:`MedGemmaInfer.read` (the same
model, lock and conversations as ``/infer``) -> a :class:`reader.Reading` kept in this browser session's
state -> the viewer (:mod:`.viewer`), the chat, the structured report. Follow-ups go through the same
conversation; exports (:mod:`.export`) read the kept reading and the report as edited.

Chinese first (:mod:`.texts`): ``?lang=en`` or the selector switches the page and the answers' language.
Each browser session has its own state and temp folder: no session sees another's uploads, readings or
conversation. Nothing on the page is fetched from outside the server.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field

import gradio as gr
import torch
from fastapi import HTTPException

from . import texts
from ...errors import InputError
from ..guards import QUEUE, Busy
from .export import reading_json, write_json, write_pdf, write_sr
from .viewer import WINDOWS, render, view_of

logger = logging.getLogger(__name__)

PATH = "/reader"
# Gradio's own few words (the upload box's "Drop File Here", ...) follow the browser's language: the page
# says Chinese to them unless it was opened with ?lang=en (the selector relabels everything else live)
LOCALE_HEAD = """<script>(function () {
  var en = new URLSearchParams(window.location.search).get("lang") === "en";
  var langs = en ? ["en"] : ["zh-CN", "zh"];
  try {
    Object.defineProperty(window.navigator, "language", {get: function () { return langs[0]; }});
    Object.defineProperty(window.navigator, "languages", {get: function () { return langs; }});
  } catch (e) {}
})();</script>"""
KEPT_TURNS = 6  # readings kept per browser session (each turn's masks can be shown again)
UPLOAD_TYPES = [".png", ".jpg", ".jpeg", ".dcm", ".zip", ".nii", ".gz", ".nrrd", ".mha", ".bmp", ".tif", ".tiff"]


def finding_line(reading, k: int) -> str:
    """Finding ``k`` as listed: its words, and the longest diameter when its outline came from the image
    (in the reading's language)."""
    line = f"{k}. {reading.findings[k - 1].text}"
    measured = (reading.extras[k - 1] if k <= len(reading.extras) else {}).get("measured")
    if measured:
        line += texts.text(reading.language, "measured", d=f"{measured['diameter_mm']:.0f}")
    return line


@dataclass
class Session:
    """One browser session's study, conversation and readings (Gradio keeps one per session)."""

    image: str = ""  # path the reader loads
    image_id: str | None = None  # datastore id, when picked from the server's studies
    conversation: dict | None = None
    turns: list = field(default_factory=list)  # (question, Reading)
    current: int = -1
    done: int = 0  # readings in this browser session (the status line numbers them)
    folder: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="medgemma-page-"))

    _view: tuple = (None, None)  # (reading, its View): drawn again on every slider move, built once

    def reading(self):
        return self.turns[self.current][1] if self.turns else None

    def view(self):
        reading = self.reading()
        if self._view[0] is not reading:
            self._view = (reading, view_of(reading))
        return self._view[1]


def _forget(session: Session | None) -> None:
    if isinstance(session, Session):
        shutil.rmtree(session.folder, ignore_errors=True)


class ReadingPage:
    """The page's handlers, bound to the server's app (its datastore and the ``medgemma`` infer task)."""

    def __init__(self, app, model: str = "medgemma"):
        self.app, self.model = app, model

    @property
    def task(self):
        return self.app._infers[self.model]

    # -------------------------------------------------------------------------------------------- reading

    def _study_of(self, upload, study_id, session: Session, lang: str) -> Session:
        if upload:
            path = upload if isinstance(upload, str) else getattr(upload, "name", "")
            new = Session(image=path)
        elif study_id:
            uri = self.app.datastore().get_image_uri(study_id)
            if not uri:
                raise gr.Error(texts.error(lang, "input", f"unknown study {study_id!r}"))
            new = Session(image=uri, image_id=study_id)
        else:
            raise gr.Error(texts.text(lang, "no_image"))
        if isinstance(session, Session):
            new.done = session.done
            _forget(session)
        return new

    def _read(self, session: Session, question: str, lang: str, follow_up: bool):
        request = {"image": session.image, "question": (question or "").strip() or None, "language": lang,
                   "conversation": session.conversation["id"] if follow_up and session.conversation else "new"}
        try:
            with QUEUE.slot():
                reading, conversation = self.task.read(request)
        except Busy as e:
            raise gr.Error(texts.error(lang, "busy", str(e))) from e
        except InputError as e:
            kind = "conversation" if e.status in (409, 410) or "conversation" in str(e) else "input"
            raise gr.Error(texts.error(lang, kind, str(e))) from e
        except HTTPException as e:
            raise gr.Error(texts.error(lang, "input", str(e.detail))) from e
        except (MemoryError, torch.OutOfMemoryError) as e:
            raise gr.Error(texts.error(lang, "memory", str(e)[:300])) from e
        except Exception as e:  # a fault: logged, said, the page and the server go on
            logger.exception("reading page: reading failed")
            raise gr.Error(texts.error(lang, "internal", f"{type(e).__name__}: {e}")) from e
        session.conversation = conversation
        session.done += 1
        session.turns.append((request["question"] or "", reading))
        for _, old in session.turns[:-KEPT_TURNS]:
            old.generation = None  # older turns keep their masks, not their attention
        session.turns = session.turns[-KEPT_TURNS:]
        session.current = len(session.turns) - 1
        return session

    def analyse(self, upload, study_id, question, lang, session):
        lang = texts.check_lang(lang)
        session = self._study_of(upload, study_id, session, lang)
        t0 = time.perf_counter()
        session = self._read(session, question, lang, follow_up=False)
        return self._shown(session, lang, time.perf_counter() - t0)

    def ask(self, question, lang, session):
        lang = texts.check_lang(lang)
        if not isinstance(session, Session) or not session.image:
            raise gr.Error(texts.text(lang, "no_image"))
        if not (question or "").strip():
            raise gr.Error(texts.text(lang, "no_question"))
        t0 = time.perf_counter()
        session = self._read(session, question, lang, follow_up=True)
        return (*self._shown(session, lang, time.perf_counter() - t0), "")

    def new_conversation(self, lang, session):
        lang = texts.check_lang(lang)
        if isinstance(session, Session):
            session.conversation, session.turns, session.current = None, [], -1
        return session, [], None, "", "", texts.text(lang, "no_reading")

    # -------------------------------------------------------------------------------------------- display

    @staticmethod
    def _chat(session: Session) -> list[dict]:
        messages = []
        for question, reading in session.turns:
            messages.append({"role": "user", "content": question or reading.question})
            lines = [reading.report]
            lines += [finding_line(reading, k) for k in range(1, len(reading.findings) + 1)]
            messages.append({"role": "assistant", "content": "\n\n".join(lines)})
        return messages

    def _shown(self, session: Session, lang: str, seconds: float):
        reading, view = session.reading(), session.view()
        ct = view.modality == "ct"
        z = view.strongest[0] if ct and view.strongest else view.slices // 2
        names = [(finding_line(reading, k), k) for k in range(1, len(reading.findings) + 1)]
        report = reading.result_json()["structured_report"]["text"]
        status = texts.text(lang, "read_in", n=session.done, seconds=seconds) + " " + texts.text(lang, "findings_n", n=len(view.names))
        turns = [(f"{i + 1}", i) for i in range(len(session.turns))]
        return (
            session,
            self._chat(session),
            render(view, z, "lung", True, [k for _, k in names], 0.45),
            gr.update(visible=ct, minimum=1, maximum=max(2, view.slices), value=z + 1, step=1),
            gr.update(visible=ct, value="lung"),
            gr.update(choices=names, value=[k for _, k in names]),
            gr.update(choices=names, value=None),
            gr.update(choices=turns, value=session.current),
            report,
            reading.report,
            status,
            self.health(session, lang),
        )

    def redraw(self, session, z, preset, heatmap, shown, opacity):
        if not isinstance(session, Session) or session.reading() is None:
            return None
        return render(session.view(), int(z or 1) - 1, preset or "lung", bool(heatmap),
                      [int(k) for k in (shown or [])], float(opacity))

    def jump(self, session, finding, preset, heatmap, shown, opacity):
        """The slider at the chosen finding's strongest slice, and that slice drawn."""
        if not isinstance(session, Session) or session.reading() is None or finding is None:
            return gr.update(), gr.update()
        view = session.view()
        k = int(finding)
        if view.modality != "ct" or not 0 < k <= len(view.strongest):
            return gr.update(), gr.update()
        z = view.strongest[k - 1] + 1
        return gr.update(value=z), self.redraw(session, z, preset, heatmap, shown, opacity)

    def show_turn(self, session, turn, lang):
        lang = texts.check_lang(lang)
        if not isinstance(session, Session) or turn is None or not 0 <= int(turn) < len(session.turns):
            return (gr.update(),) * 12
        session.current = int(turn)
        shown = list(self._shown(session, lang, 0.0))
        shown[10] = gr.update()  # the status line stays the last reading's
        shown[7] = gr.update()
        return tuple(shown)

    # -------------------------------------------------------------------------------------------- health

    def health(self, session=None, lang: str = "zh") -> str:
        """Model, precision and why, device, queue, and the last reading's seconds per stage."""
        lang = texts.check_lang(lang)
        info = self.task.reader.info.public()
        t = lambda key: texts.text(lang, key)  # noqa: E731
        lines = [f"**{info.get('label') or info.get('id')}**", "",
                 f"- {t('model')}: `{info.get('id')}` ({info.get('parameters', 0) / 1e6:.1f} M)",
                 f"- {t('precision')}: **{info.get('precision')}** ({info.get('precision_reason')})",
                 f"- {t('device')}: {info.get('device')}",
                 f"- {t('queue')}: {QUEUE.in_flight} / {QUEUE.max_queue}"]
        reading = session.reading() if isinstance(session, Session) else None
        if reading is not None:
            lat = reading.latencies
            stages = ", ".join(f"{texts.STAGES[k][lang == 'en']} {lat[k]}" for k in texts.STAGES if k in lat)
            lines.append(f"- {t('latency')}: {stages}; {texts.text(lang, 'tokens', n=lat.get('new_tokens', 0))}")
        return "\n".join(lines)

    def doctor(self, lang: str = "zh") -> str:
        """The doctor's checks of this server (model, precision and device as it runs them), as a table."""
        from ...doctor import run_checks

        lang = texts.check_lang(lang)
        reader = self.task.reader
        checks = run_checks(reader.model_ref, reader.device_request, reader.info.precision, self.app.studies)
        head = [texts.text(lang, k) for k in ("check_name", "check_status", "check_detail")]
        rows = [f"| {texts.check_name(lang, c.name)} | {texts.text(lang, 'status_' + c.status)} | {c.detail} |"
                for c in checks]
        return "\n".join([f"| {' | '.join(head)} |", "|---|---|---|", *rows])

    # -------------------------------------------------------------------------------------------- export

    def export(self, kind: str, session, report_text, lang, z, preset, heatmap, shown, opacity):
        lang = texts.check_lang(lang)
        if not isinstance(session, Session) or session.reading() is None:
            raise gr.Error(texts.text(lang, "no_reading"))
        reading = session.reading()
        data = reading_json(reading, report_text, session.conversation)
        stem = os.path.join(session.folder, f"medgemma-report-{session.current + 1}")
        try:
            if kind == "json":
                return [write_json(data, stem + ".json")], ""
            if kind == "pdf":
                image = self.redraw(session, z, preset, heatmap, shown, opacity)
                return [write_pdf(data, image, stem + ".pdf", lang)], ""
            return self._export_sr(session, reading, data, stem, lang)
        except InputError as e:
            raise gr.Error(texts.error(lang, "export", str(e))) from e
        except gr.Error:
            raise
        except Exception as e:  # a fault: logged and said; the reading stays
            logger.exception("reading page: %s export failed", kind)
            raise gr.Error(texts.error(lang, "export", f"{type(e).__name__}: {e}")) from e

    def export_pdf(self, *args):
        return self.export("pdf", *args)

    def export_json(self, *args):
        return self.export("json", *args)

    def export_sr(self, *args):
        return self.export("sr", *args)

    def _export_sr(self, session: Session, reading, data: dict, stem: str, lang: str):
        from ...io.writers import write_in_geometry

        if not str(reading.study.source.get("format", "")).startswith("DICOM"):
            raise gr.Error(texts.text(lang, "sr_needs_dicom", kind=reading.study.source.get("format", "?")))
        labels = write_in_geometry(reading.labels, reading.geometry, stem + "-labels.nrrd")
        files = write_sr(session.image, labels, data, stem + "-dicom")
        note = ""
        from ..pacs import PACSDatastore

        datastore = self.app.datastore()
        if session.image_id and isinstance(datastore, PACSDatastore):
            label_id = datastore.save_label(session.image_id, labels, "final", {"reading": data})
            stored = datastore.export_of(label_id)
            note = texts.text(lang, "stored_pacs", uids=", ".join(f"{k} {v['SeriesInstanceUID']}" for k, v in stored.items()))
        return [files[k] for k in ("sr", "seg") if k in files], note

    # -------------------------------------------------------------------------------------------- studies

    def studies(self) -> list[str]:
        try:
            return sorted(self.app.datastore().list_images())
        except Exception:  # a PACS that does not answer: the page still works with uploads
            logger.warning("reading page: the datastore's studies could not be listed", exc_info=True)
            return []


def build(app, max_file_size: int | None = None) -> gr.Blocks:
    """The page's Blocks for the server's ``app``."""
    page = ReadingPage(app, next(iter(app._infers), "medgemma"))
    t = lambda key: texts.text("zh", key)  # noqa: E731  (labels start in Chinese; the selector relabels)
    with gr.Blocks(title=t("title"), analytics_enabled=False) as blocks:
        session = gr.State(value=None, delete_callback=_forget, time_to_live=4 * 3600)
        with gr.Row():
            title = gr.Markdown(f"## {t('title')}", elem_id="title")
            lang = gr.Radio([("中文", "zh"), ("English", "en")], value="zh", label="界面语言 / Language", elem_id="lang")
        banner = gr.Markdown(t("banner"), elem_id="banner")
        with gr.Row():
            with gr.Column(scale=4):
                upload = gr.File(label=t("upload"), file_types=UPLOAD_TYPES, type="filepath", elem_id="upload")
                study = gr.Dropdown(choices=page.studies(), value=None, label=t("study"), elem_id="study")
                question = gr.Textbox(label=t("question"), placeholder=t("question_hint"), elem_id="question")
                with gr.Row():
                    analyse = gr.Button(t("analyse"), variant="primary", elem_id="analyse")
                    cancel = gr.Button(t("cancel"), elem_id="cancel")
                status = gr.Markdown(t("no_reading"), elem_id="status")
                chat = gr.Chatbot(label=t("chat"), height=320, elem_id="chat", feedback_options=None)
                follow = gr.Textbox(label=t("question"), placeholder=texts.PRESETS["zh"][1], elem_id="follow")
                with gr.Row():
                    ask = gr.Button(t("ask"), variant="primary", elem_id="ask")
                    new = gr.Button(t("new_chat"), elem_id="new")
                presets_label = gr.Markdown(f"**{t('presets')}**")
                with gr.Row():
                    presets = [gr.Button(q, size="sm", elem_id=f"preset{i}") for i, q in enumerate(texts.PRESETS["zh"])]
            with gr.Column(scale=5):
                image = gr.Image(label=t("viewer"), type="numpy", interactive=False, format="png", elem_id="viewer",
                                 buttons=["download"])
                slider = gr.Slider(1, 2, value=1, step=1, label=t("slice"), visible=False, elem_id="slice")
                window = gr.Radio([(t(k), k) for k in WINDOWS], value="lung", label=t("window"), visible=False,
                                  elem_id="window")
                with gr.Row():
                    heat = gr.Checkbox(value=True, label=t("heatmap"), elem_id="heat")
                    opacity = gr.Slider(0, 1, value=0.45, step=0.05, label=t("opacity"), elem_id="opacity")
                masks = gr.CheckboxGroup(choices=[], label=t("masks"), elem_id="masks")
                jump = gr.Dropdown(choices=[], value=None, label=t("jump"), elem_id="jump")
                turn = gr.Radio(choices=[], label=t("turn"), elem_id="turn")
            with gr.Column(scale=4):
                report = gr.Textbox(label=t("report"), lines=14, interactive=True, elem_id="report")
                answer = gr.Textbox(label=t("answer"), lines=3, interactive=False, elem_id="answer")
                with gr.Row():
                    pdf = gr.Button(t("export_pdf"), elem_id="export_pdf")
                    js = gr.Button(t("export_json"), elem_id="export_json")
                    sr = gr.Button(t("export_sr"), elem_id="export_sr")
                files = gr.File(label=t("downloads"), file_count="multiple", interactive=False, elem_id="files")
                export_note = gr.Markdown("", elem_id="export_note")
                with gr.Accordion(t("health"), open=False, elem_id="health_panel") as health_panel:
                    health = gr.Markdown(page.health(lang="zh"), elem_id="health")
                    check = gr.Button(t("check"), size="sm", elem_id="check")
                    doctor = gr.Markdown("", elem_id="doctor")

        shown = [session, chat, image, slider, window, masks, jump, turn, report, answer, status, health]
        view_inputs = [session, slider, window, heat, masks, opacity]
        reading_a = analyse.click(page.analyse, [upload, study, question, lang, session], shown,
                                  concurrency_limit=None)
        reading_b = ask.click(page.ask, [follow, lang, session], [*shown, follow], concurrency_limit=None)
        reading_c = follow.submit(page.ask, [follow, lang, session], [*shown, follow], concurrency_limit=None)
        preset_events = [b.click(page.ask, [b, lang, session], [*shown, follow], concurrency_limit=None) for b in presets]
        cancel.click(lambda lang: texts.text(texts.check_lang(lang), "cancelled"), [lang], [status],
                     cancels=[reading_a, reading_b, reading_c, *preset_events])
        new.click(page.new_conversation, [lang, session], [session, chat, image, report, answer, status])
        for control in (slider, window, heat, masks, opacity):
            # a person's moves only: a reading's own output draws the image, and the change events its
            # updates would fire could carry controls not yet updated (another slice than the slider shows)
            control.input(page.redraw, view_inputs, [image], show_progress="hidden")
        jump.input(page.jump, [session, jump, *view_inputs[2:]], [slider, image])
        turn.input(page.show_turn, [session, turn, lang], shown)
        for button, handler in ((pdf, page.export_pdf), (js, page.export_json), (sr, page.export_sr)):
            button.click(handler, [session, report, lang, *view_inputs[1:]], [files, export_note])
        check.click(page.doctor, [lang], [doctor])

        labelled = [(upload, "upload"), (study, "study"), (question, "question"),
                    (chat, "chat"), (follow, "question"), (image, "viewer"), (slider, "slice"), (heat, "heatmap"),
                    (opacity, "opacity"), (masks, "masks"), (jump, "jump"), (turn, "turn"), (report, "report"),
                    (answer, "answer"), (files, "downloads")]
        buttons = [(analyse, "analyse"), (cancel, "cancel"), (ask, "ask"), (new, "new_chat"), (pdf, "export_pdf"),
                   (js, "export_json"), (sr, "export_sr"), (check, "check")]

        def relabel(lang, session):
            lang = texts.check_lang(lang)
            out = [f"## {texts.text(lang, 'title')}", texts.text(lang, "banner"), f"**{texts.text(lang, 'presets')}**",
                   gr.update(label=texts.text(lang, "health"))]
            out += [gr.update(label=texts.text(lang, key)) for _, key in labelled]
            out[4 + 2] = gr.update(label=texts.text(lang, "question"), placeholder=texts.text(lang, "question_hint"))
            out += [gr.update(value=texts.text(lang, key)) for _, key in buttons]
            out += [gr.update(value=q) for q in texts.PRESETS[lang]]
            out.append(gr.update(label=texts.text(lang, "window"),
                                 choices=[(texts.text(lang, k), k) for k in WINDOWS]))
            out.append(page.health(session, lang))
            return out

        lang.change(relabel, [lang, session], [title, banner, presets_label, health_panel, *[c for c, _ in labelled],
                                               *[b for b, _ in buttons], *presets, window, health])

        def on_load(request: gr.Request):
            asked = (request.query_params.get("lang") or "zh") if request else "zh"
            return texts.check_lang(asked), gr.update(choices=page.studies())  # the datastore as it is now

        blocks.load(on_load, None, [lang, study])
    blocks.queue(default_concurrency_limit=1, max_size=None)
    return blocks


def auth_dependency():
    """With MONAI Label's auth on, the page asks for the same bearer token as ``/infer`` (an
    ``Authorization`` header, or an ``access_token`` cookie a login proxy set); None (401) otherwise."""
    from monailabel.config import settings

    if not settings.MONAI_LABEL_AUTH_ENABLE:
        return None

    def user_of(request) -> str | None:
        from monailabel.endpoints.user.auth import from_token

        header = request.headers.get("authorization", "")
        token = header[7:] if header.lower().startswith("bearer ") else request.cookies.get("access_token", "")
        if not token:
            return None
        try:
            user = from_token(token)
        except Exception:
            return None
        return user.username or None

    return user_of


def mount(fastapi_app, app, max_upload_bytes: int) -> None:
    """Mount the page at ``/reader/`` on the running server's FastAPI app."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    blocks = build(app)
    theme = gr.themes.Default(font=["Noto Sans CJK SC", "WenQuanYi Micro Hei", "sans-serif"],
                              font_mono=["DejaVu Sans Mono", "monospace"])
    gr.mount_gradio_app(fastapi_app, blocks, path=PATH, auth_dependency=auth_dependency(), theme=theme,
                        max_file_size=max_upload_bytes, footer_links=[], show_error=True, ssr_mode=False, head=LOCALE_HEAD,
                        mcp_server=False)
    # Gradio starts its queue in the server's start-up (lifespan); MONAI Label builds this app inside its
    # own start-up, after that point: start it here
    blocks.run_startup_events()
    asyncio.get_running_loop().create_task(blocks.run_extra_startup_events())
    logger.info("reading page at %s/", PATH)
