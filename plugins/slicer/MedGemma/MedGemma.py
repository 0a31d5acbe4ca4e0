"""3D Slicer module "MedGemma": findings text, one segment per finding, the attention heatmap and
follow-up questions, from a MONAI Label server running the medgemma app (public REST API only).

Thin Qt/MRML layer: requests, parsing, conversation state and the finding -> segment/slice mapping live
in ``MedGemmaLib`` (plain Python, tested against a real server by the project's test suite).
"""

from __future__ import annotations

import os
import re
import tempfile

import ctk
import qt
import slicer
import vtk
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)

from MedGemmaLib import Cancelled, InferJob, MedGemmaClient, ServerError, StudyConversation

DEFAULT_URL = "http://127.0.0.1:8000"


class MedGemma(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        parent.title = "MedGemma"
        parent.categories = ["Active Learning"]
        parent.dependencies = []
        parent.contributors = ["monailabel-medgemma"]
        parent.helpText = (
            "Ask a MONAI Label server running the medgemma app about the current volume: the findings "
            "report, one segment per finding (named after it), the attention heatmap, and follow-up questions."
        )
        parent.acknowledgementText = "Uses MONAI Label's REST API; MedGemma is a Google model."


class MedGemmaWidget(ScriptedLoadableModuleWidget):
    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        self.logic = MedGemmaLogic()
        self.job = None
        self.timer = qt.QTimer()
        self.timer.setInterval(200)
        self.timer.connect("timeout()", self._poll)

        server = ctk.ctkCollapsibleButton()
        server.text = "Server"
        self.layout.addWidget(server)
        form = qt.QFormLayout(server)
        self.url = qt.QLineEdit(DEFAULT_URL)
        form.addRow("MONAI Label server:", self.url)
        self.connectButton = qt.QPushButton("Connect")
        self.serverInfo = qt.QLabel("not connected")
        self.serverInfo.wordWrap = True
        form.addRow(self.connectButton, self.serverInfo)

        study = ctk.ctkCollapsibleButton()
        study.text = "Study and question"
        self.layout.addWidget(study)
        form = qt.QFormLayout(study)
        self.volume = slicer.qMRMLNodeComboBox()
        self.volume.nodeTypes = ["vtkMRMLScalarVolumeNode"]
        self.volume.noneEnabled = False
        self.volume.setMRMLScene(slicer.mrmlScene)
        form.addRow("Volume:", self.volume)
        self.question = qt.QLineEdit()
        self.question.placeholderText = "Describe the findings (leave empty for the default question)"
        form.addRow("Question:", self.question)
        self.language = qt.QComboBox()
        for text, code in (("auto (the question's)", "auto"), ("中文", "zh"), ("English", "en")):
            self.language.addItem(text, code)
        form.addRow("Answer language:", self.language)
        buttons = qt.QHBoxLayout()
        self.askButton = qt.QPushButton("Ask")
        self.newButton = qt.QPushButton("New conversation")
        self.cancelButton = qt.QPushButton("Cancel")
        self.cancelButton.enabled = False
        for b in (self.askButton, self.newButton, self.cancelButton):
            buttons.addWidget(b)
        form.addRow(buttons)
        self.progress = qt.QProgressBar()
        self.progress.setRange(0, 0)
        self.progress.visible = False
        form.addRow(self.progress)
        self.status = qt.QLabel("")
        self.status.wordWrap = True
        form.addRow(self.status)

        answer = ctk.ctkCollapsibleButton()
        answer.text = "Report and findings"
        self.layout.addWidget(answer)
        form = qt.QFormLayout(answer)
        self.report = qt.QTextEdit()
        self.report.readOnly = True
        form.addRow("Report:", self.report)
        self.structured = qt.QTextEdit()
        self.structured.readOnly = True
        form.addRow("Structured report:", self.structured)
        self.findings = qt.QListWidget()
        form.addRow("Findings:", self.findings)
        self.pointKind = qt.QComboBox()
        self.pointKind.addItem("(the selected finding)", "")
        for kind in ("nodule", "mass", "consolidation", "ground-glass opacity", "opacity", "effusion", "pneumothorax"):
            self.pointKind.addItem(kind, kind)
        form.addRow("Point adds:", self.pointKind)
        self.placeButton = qt.QPushButton("Click a point to correct the mask")
        self.placeButton.toolTip = ("Then click inside the lesion in a slice view: the selected finding's mask (or, with "
                                    "a kind chosen, a new finding) is grown from that point in the image")
        self.placeButton.checkable = True
        form.addRow(self.placeButton)
        self.opacity = ctk.ctkSliderWidget()
        self.opacity.minimum, self.opacity.maximum, self.opacity.singleStep, self.opacity.value = 0.0, 1.0, 0.05, 0.4
        form.addRow("Heatmap opacity:", self.opacity)
        self.history = qt.QTextEdit()
        self.history.readOnly = True
        form.addRow("Conversation:", self.history)
        self.layout.addStretch(1)

        self.connectButton.connect("clicked(bool)", self.onConnect)
        self.askButton.connect("clicked(bool)", self.onAsk)
        self.newButton.connect("clicked(bool)", self.onNewConversation)
        self.cancelButton.connect("clicked(bool)", self.onCancel)
        self.findings.connect("itemClicked(QListWidgetItem*)", self.onFindingClicked)
        self.placeButton.connect("toggled(bool)", self.onPlaceToggled)
        self.opacity.connect("valueChanged(double)", self.logic.setHeatmapOpacity)
        self.volume.connect("currentNodeChanged(vtkMRMLNode*)", lambda node: self.onNewConversation())

    def cleanup(self):
        self.timer.stop()

    # --- actions -----------------------------------------------------------------------------------
    def onConnect(self):
        try:
            self.serverInfo.text = self.logic.connect(self.url.text)
        except ServerError as e:
            self.serverInfo.text = f"cannot connect: {e}"

    def onNewConversation(self):
        self.logic.restart()
        self.history.plainText = ""
        self.status.text = "new conversation"

    def onAsk(self):
        node = self.volume.currentNode()
        if node is None:
            self.status.text = "choose a volume first"
            return
        if self.logic.client is None:
            self.onConnect()
            if self.logic.client is None:
                return
        self.status.text = "uploading the volume and asking the model ..."
        try:
            self.job = self.logic.ask(node, self.question.text.strip() or None,
                                      self.language.itemData(self.language.currentIndex))
        except ServerError as e:
            self.status.text = f"server error: {e}"
            return
        self._busy(True)
        self.timer.start()

    def onCancel(self):
        if self.job is not None:
            self.job.cancel()
        self._busy(False)
        self.status.text = "cancelled (the server finishes the request; its answer is dropped)"

    def _poll(self):
        if self.job is None or not self.job.done:
            return
        self.timer.stop()
        job, self.job = self.job, None
        self._busy(False)
        try:
            result = job.result()
        except Cancelled:
            return
        except ServerError as e:
            self.status.text = f"server error: {e}"
            return
        except Exception as e:  # noqa: BLE001 (shown, not raised into Qt)
            self.status.text = f"failed: {type(e).__name__}: {e}"
            return
        self.logic.show(result, self.volume.currentNode(), self.opacity.value)
        self.report.plainText = result.report
        self.structured.plainText = result.structured_report
        self._list(result)
        self.history.plainText = "\n\n".join(f"Q: {h['question']}\nA: {h['answer']}" for h in self.logic.history())
        self.status.text = f"{len(result.findings)} finding(s); turn {(result.conversation or {}).get('turn', 1)}"

    def onPlaceToggled(self, on: bool):
        if on and self.logic.result is None and not self.pointKind.itemData(self.pointKind.currentIndex):
            self.status.text = "ask first, or choose what the point adds"
            self.placeButton.checked = False
            return
        self.logic.placePoints(on, self.onPointPlaced)
        self.status.text = "click inside the lesion in a slice view" if on else ""

    def onPointPlaced(self, ras):
        self.placeButton.checked = False
        item = self.findings.currentItem()
        kind = self.pointKind.itemData(self.pointKind.currentIndex) or None
        finding = None if kind or item is None else int(item.text().split(".", 1)[0])
        if finding is None and kind is None:
            self.status.text = "select a finding in the list, or choose what the point adds"
            return
        try:
            result = self.logic.correct(self.volume.currentNode(), ras, finding, kind)
        except ServerError as e:
            self.status.text = f"server error: {e}"
            return
        self.logic.show(result, self.volume.currentNode(), self.opacity.value)
        self._list(result)
        self.status.text = f"mask grown from the point in {result.raw.get('latencies', {}).get('correct', '?')} s"

    def _list(self, result):
        self.findings.clear()
        for f in result.findings:
            size = f" ({f.diameter_mm:.0f} mm)" if f.diameter_mm else ""
            self.findings.addItem(f"{f.label}. {f.name}: {f.text}{size}")

    def onFindingClicked(self, item):
        label = int(item.text().split(".", 1)[0])
        self.logic.jumpToFinding(label)

    def _busy(self, busy: bool):
        self.progress.visible = busy
        self.cancelButton.enabled = busy
        self.askButton.enabled = not busy


class MedGemmaLogic(ScriptedLoadableModuleLogic):
    """MRML side: upload the volume, load the label file as named segments and the heatmap as a colour
    overlay, jump to a finding's strongest slice. Talking to the server is MedGemmaLib's."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self.client = None
        self.conversation = None
        self.image_ids = {}  # volume node id -> datastore image id
        self.result = None
        self.volumeNode = self.segmentationNode = self.heatmapNode = None
        self.pointNode, self.pointCallback = None, None

    def connect(self, url: str) -> str:
        client = MedGemmaClient(url)
        info = client.info()
        model = info.get("models", {}).get("medgemma")
        if model is None:
            raise ServerError(None, f"{url} serves no 'medgemma' model (has {sorted(info.get('models', {}))})")
        self.client = client
        m = model.get("model", {})
        return f"{m.get('id', '?')} {m.get('label', '')} in {m.get('precision', '?')} on {m.get('device', '?')}"

    def restart(self):
        self.conversation = None

    def history(self) -> list:
        return self.conversation.history if self.conversation else []

    def ask(self, volumeNode, question, language="auto"):
        image_id = self._upload(volumeNode)
        if self.conversation is None or self.conversation.image_id != image_id:
            self.conversation = StudyConversation(self.client, image_id)
        return InferJob(self.conversation.ask, question, language=language)

    def _upload(self, volumeNode) -> str:
        if volumeNode.GetID() in self.image_ids:
            return self.image_ids[volumeNode.GetID()]
        image_id = re.sub(r"[^A-Za-z0-9_-]", "_", volumeNode.GetName()) or "volume"
        path = os.path.join(tempfile.mkdtemp(prefix="medgemma_"), image_id + ".nrrd")
        slicer.util.saveNode(volumeNode, path)
        self.image_ids[volumeNode.GetID()] = self.client.upload(path, image_id)
        return self.image_ids[volumeNode.GetID()]

    def show(self, result, volumeNode, opacity: float):
        self.result, self.volumeNode = result, volumeNode
        labelNode = slicer.util.loadLabelVolume(result.label_file, {"show": False})
        if self.segmentationNode is None or slicer.mrmlScene.GetNodeByID(self.segmentationNode.GetID()) is None:
            self.segmentationNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "MedGemma findings")
            self.segmentationNode.CreateDefaultDisplayNodes()
        self.segmentationNode.GetSegmentation().RemoveAllSegments()
        self.segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
        slicer.modules.segmentations.logic().ImportLabelmapToSegmentationNode(labelNode, self.segmentationNode)
        names = {value: name for name, value in result.label_names.items()}
        segmentation = self.segmentationNode.GetSegmentation()
        for i in range(segmentation.GetNumberOfSegments()):
            segment = segmentation.GetNthSegment(i)
            if segment.GetLabelValue() in names:
                segment.SetName(names[segment.GetLabelValue()])
        slicer.mrmlScene.RemoveNode(labelNode)
        path = self.client.heatmap(result)
        if path:
            if self.heatmapNode is not None:
                slicer.mrmlScene.RemoveNode(self.heatmapNode)
            self.heatmapNode = slicer.util.loadVolume(path, {"show": False, "name": "MedGemma heatmap"})
            self.heatmapNode.GetDisplayNode().SetAndObserveColorNodeID("vtkMRMLColorTableNodeRainbow")
            slicer.util.setSliceViewerLayers(background=volumeNode, foreground=self.heatmapNode,
                                             foregroundOpacity=opacity)

    def placePoints(self, on: bool, callback):
        """Place one markups point in a slice view; ``callback(ras)`` gets it (then the point is removed)."""
        if self.pointNode is None or slicer.mrmlScene.GetNodeByID(self.pointNode.GetID()) is None:
            self.pointNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "MedGemma point")
            self.pointNode.AddObserver(self.pointNode.PointPositionDefinedEvent, lambda node, event: self._placed(node))
        self.pointCallback = callback if on else None
        slicer.modules.markups.logic().SetActiveList(self.pointNode)
        interaction = slicer.app.applicationLogic().GetInteractionNode()
        interaction.SetCurrentInteractionMode(interaction.Place if on else interaction.ViewTransform)

    def _placed(self, node):
        if node.GetNumberOfControlPoints() == 0 or self.pointCallback is None:
            return
        ras = [0.0, 0.0, 0.0]
        node.GetNthControlPointPositionWorld(node.GetNumberOfControlPoints() - 1, ras)
        node.RemoveAllControlPoints()
        callback, self.pointCallback = self.pointCallback, None
        callback(ras)

    def correct(self, volumeNode, ras, finding=None, kind=None):
        """The finding's mask grown from the point at ``ras`` (the volume's IJK, as MONAI Label's DeepEdit sends)."""
        matrix = vtk.vtkMatrix4x4()
        volumeNode.GetRASToIJKMatrix(matrix)
        ijk = [int(round(v)) for v in matrix.MultiplyPoint(list(ras) + [1.0])[:3]]
        return self.client.correct(self._upload(volumeNode), [ijk], finding=finding, kind=kind)

    def setHeatmapOpacity(self, opacity: float):
        if self.heatmapNode is not None:
            slicer.util.setSliceViewerLayers(foregroundOpacity=opacity)

    def jumpToFinding(self, label: int):
        """Centre the slice views on the finding's strongest voxel (CT: on its strongest slice)."""
        if self.result is None or self.volumeNode is None:
            return
        finding = next((f for f in self.result.findings if f.label == label), None)
        if finding is None or not finding.peak:
            return
        kji = list(finding.peak) + [0] * (3 - len(finding.peak))  # a radiograph is one plane
        ijk = [kji[2], kji[1], kji[0], 1.0] if len(finding.peak) == 3 else [kji[1], kji[0], 0, 1.0]
        matrix = vtk.vtkMatrix4x4()
        self.volumeNode.GetIJKToRASMatrix(matrix)
        ras = matrix.MultiplyPoint(ijk)
        slicer.modules.markups.logic().JumpSlicesToLocation(ras[0], ras[1], ras[2], True)
        if self.segmentationNode is not None:
            segmentation = self.segmentationNode.GetSegmentation()
            for i in range(segmentation.GetNumberOfSegments()):
                segment = segmentation.GetNthSegment(i)
                self.segmentationNode.GetDisplayNode().SetSegmentOpacity3D(
                    segmentation.GetNthSegmentID(i), 1.0 if segment.GetName() == finding.name else 0.3)


class MedGemmaTest(ScriptedLoadableModuleTest):
    """Inside Slicer: the module loads and its widget builds (the server side is tested outside Slicer)."""

    def runTest(self):
        slicer.mrmlScene.Clear()
        self.assertIsNotNone(slicer.modules.medgemma)
        widget = slicer.modules.medgemma.widgetRepresentation()
        self.assertIsNotNone(widget)
        self.delayDisplay("MedGemma module loaded")
