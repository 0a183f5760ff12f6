{{/* Names and labels. */}}
{{- define "deepspec.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "deepspec.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "deepspec.selectorLabels" -}}
app.kubernetes.io/name: {{ include "deepspec.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "deepspec.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "deepspec.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: {{ .Values.engine }}
{{- end }}

{{/*
Cross-field checks that values.schema.json cannot word well. Each message names the key and
the fix. Included once, by the Deployment.
*/}}
{{- define "deepspec.validate" -}}
{{- $v := .Values }}
{{- if and (eq $v.engine "tgi") (not (has $v.speculative.method (list "medusa" "mlp_speculator"))) }}
{{- fail (printf "speculative.method: engine tgi serves only medusa or mlp_speculator drafts, not %q (TGI has no standalone draft model or EAGLE); serve this draft with engine: vllm" $v.speculative.method) }}
{{- end }}
{{- if and (eq $v.engine "vllm") (not $v.model) }}
{{- fail "model: engine vllm needs the target (a Hub id or a path in the pod), e.g. --set model=HuggingFaceTB/SmolLM2-135M-Instruct" }}
{{- end }}
{{- if and (eq $v.engine "tgi") $v.model }}
{{- fail "model: with engine tgi the model is the draft (the speculator names its base model); leave model empty and set draft" }}
{{- end }}
{{- if not $v.draft }}
{{- fail "draft: no draft given; set it to the export's Hub id (ORG/NAME), its path in the pod, or its name under the model volume's drafts/" }}
{{- end }}
{{- if and (eq $v.modelCache.type "existingClaim") (not $v.modelCache.existingClaim) }}
{{- fail "modelCache.existingClaim: modelCache.type is existingClaim but no claim is named; set modelCache.existingClaim=CLAIM" }}
{{- end }}
{{- if and $v.autoscaling.enabled (eq $v.engine "tgi") }}
{{- fail "autoscaling.enabled: the autoscaler scales on vLLM's queue (vllm:num_requests_waiting); TGI has none here, leave it off" }}
{{- end }}
{{- end }}

{{/* The draft: a Hub id (ORG/NAME), an absolute path, or a name under <mount>/drafts/. */}}
{{- define "deepspec.draftFromHub" -}}
{{- if and (not (hasPrefix "/" .Values.draft)) (contains "/" .Values.draft) }}true{{ end }}
{{- end }}

{{- define "deepspec.draftPath" -}}
{{- $d := .Values.draft }}
{{- if hasPrefix "/" $d }}{{ $d }}
{{- else }}{{ printf "%s/drafts/%s" .Values.modelCache.mountPath (replace "/" "--" $d) }}
{{- end }}
{{- end }}

{{- define "deepspec.manifestPath" -}}
{{- if hasPrefix "/" .Values.deepspec.manifest }}{{ .Values.deepspec.manifest }}
{{- else }}{{ printf "%s/%s" (include "deepspec.draftPath" .) .Values.deepspec.manifest }}
{{- end }}
{{- end }}

{{- define "deepspec.image" -}}
{{- $defaults := dict "vllm" (dict "repository" "vllm/vllm-openai" "tag" "v0.32.0") "tgi" (dict "repository" "ghcr.io/huggingface/text-generation-inference" "tag" "3.3.2") }}
{{- $d := get $defaults .Values.engine }}
{{- printf "%s:%s" (default $d.repository .Values.image.repository) (default $d.tag .Values.image.tag) }}
{{- end }}

{{- define "deepspec.pluginImage" -}}
{{- printf "%s:%s" .Values.plugin.image.repository .Values.plugin.image.tag }}
{{- end }}

{{- define "deepspec.servedModelName" -}}
{{- default .Values.model .Values.servedModelName }}
{{- end }}

{{/* vLLM's --speculative-config, the same keys `dspec export vllm` writes. */}}
{{- define "deepspec.speculativeConfig" -}}
{{- $s := .Values.speculative }}
{{- dict "method" $s.method "model" (include "deepspec.draftPath" .) "num_speculative_tokens" (int $s.k) "draft_sample_method" $s.draftSampleMethod | toJson }}
{{- end }}

{{- define "deepspec.command" -}}
{{- if .Values.command }}{{ toJson .Values.command }}
{{- else if eq .Values.engine "vllm" }}["python3", "-m", "vllm.entrypoints.openai.api_server"]
{{- else }}["text-generation-launcher"]
{{- end }}
{{- end }}

{{- define "deepspec.args" -}}
{{- $a := list }}
{{- if eq .Values.engine "vllm" }}
{{- $a = list "--model" .Values.model "--host" "0.0.0.0" "--port" (toString (int .Values.service.port)) "--speculative-config" (include "deepspec.speculativeConfig" .) }}
{{- if .Values.servedModelName }}{{ $a = concat $a (list "--served-model-name" .Values.servedModelName) }}{{ end }}
{{- else }}
{{- $a = list "--model-id" (include "deepspec.draftPath" .) "--speculate" (toString (int .Values.speculative.k)) "--hostname" "0.0.0.0" "--port" (toString (int .Values.service.port)) }}
{{- end }}
{{- toJson (concat $a .Values.args) }}
{{- end }}

{{- define "deepspec.claimName" -}}
{{- if eq .Values.modelCache.type "existingClaim" }}{{ .Values.modelCache.existingClaim }}
{{- else }}{{ printf "%s-models" (include "deepspec.fullname" .) }}
{{- end }}
{{- end }}

{{/* Capabilities: monitoring objects render only where the cluster has their CRDs. */}}
{{- define "deepspec.hasMonitor" -}}
{{- if .Capabilities.APIVersions.Has (printf "monitoring.coreos.com/v1/%s" .Values.monitoring.scrape.kind) }}true{{ end }}
{{- end }}

{{- define "deepspec.hasPrometheusRule" -}}
{{- if .Capabilities.APIVersions.Has "monitoring.coreos.com/v1/PrometheusRule" }}true{{ end }}
{{- end }}

{{/* Writable places (the root filesystem is read-only) and the Hub token, for every container
that runs the engine or fetches from the Hub. */}}
{{- define "deepspec.commonEnv" -}}
- {name: HOME, value: /scratch}
- {name: XDG_CACHE_HOME, value: /scratch/.cache}
- {name: HF_HOME, value: {{ printf "%s/hf" .Values.modelCache.mountPath | quote }}}
{{- if .Values.hub.existingSecret }}
- name: HF_TOKEN
  valueFrom:
    secretKeyRef: {name: {{ .Values.hub.existingSecret | quote }}, key: {{ .Values.hub.tokenKey | quote }}}
{{- end }}
{{- end }}

{{- define "deepspec.commonMounts" -}}
- {name: models, mountPath: {{ .Values.modelCache.mountPath | quote }}}
- {name: scratch, mountPath: /scratch}
- {name: tmp, mountPath: /tmp}
{{- end }}
