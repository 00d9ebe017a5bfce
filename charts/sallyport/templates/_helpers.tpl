{{/* Labels every object carries; `component` is controller, agent or webhook. */}}
{{- define "sallyport.labels" -}}
app.kubernetes.io/part-of: sallyport
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
{{- with .component }}
app.kubernetes.io/component: {{ . }}
{{- end }}
{{- end }}

{{/* The selector of a workload's pods: fixed names, one release per cluster. */}}
{{- define "sallyport.selector" -}}
app.kubernetes.io/name: sallyport-{{ . }}
{{- end }}

{{- define "sallyport.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{/* The webhook's Service DNS names, which its certificate must carry. */}}
{{- define "sallyport.webhookNames" -}}
{{- $ns := .Release.Namespace -}}
{{ list (printf "sallyport-webhook.%s.svc" $ns) (printf "sallyport-webhook.%s.svc.cluster.local" $ns) | toJson }}
{{- end }}
