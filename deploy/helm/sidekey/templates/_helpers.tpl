{{/* Names and labels. */}}
{{- define "sidekey.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "sidekey.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "sidekey.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: sidekey
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end -}}

{{/* The pods the broker runs in: the gateway's, or the application's (sidecar). */}}
{{- define "sidekey.selectorLabels" -}}
{{- if eq .Values.mode "gateway" -}}
app.kubernetes.io/name: {{ include "sidekey.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- else -}}
app.kubernetes.io/name: {{ .Values.app.name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}
{{- end -}}

{{- define "sidekey.serviceAccountName" -}}
{{- if eq .Values.mode "gateway" -}}
{{- default (include "sidekey.fullname" .) .Values.gateway.serviceAccount.name -}}
{{- else -}}
{{- default .Values.app.name .Values.app.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "sidekey.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/*
The checkov checks the chart skips, each with its reason, as checkov.io/skip annotations on
the objects they concern (tests/test_helm_chart.py accepts no failed check and no other skip).
CKV_K8S_43 (pull by digest) is skipped only while an image is pulled by tag: set image.digest,
and name the app's images by digest, and it is checked.
*/}}
{{- define "sidekey.checkovSkips" -}}
{{- $pinned := ne .Values.image.digest "" -}}
{{- if eq .Values.mode "sidecar" -}}
{{- range .Values.app.containers -}}
{{- if not (contains "@sha256:" (toString .image)) -}}{{- $pinned = false -}}{{- end -}}
{{- end -}}
{{- end -}}
{{- if not $pinned -}}
checkov.io/skip1: CKV_K8S_43=Images are pulled by tag until image.digest (and the app's images) name a digest; no digest of an unbuilt image can be a default
{{- end -}}
{{- end -}}

{{/*
The hardened securityContext every container gets: non-root, read-only root file system, no
privilege escalation, no capability, the runtime's default seccomp profile.
*/}}
{{- define "sidekey.containerSecurityContext" -}}
runAsNonRoot: true
readOnlyRootFilesystem: true
allowPrivilegeEscalation: false
privileged: false
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "sidekey.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.runAsUser }}
runAsGroup: {{ .Values.runAsGroup }}
# The sidecar's unix socket (mode 0660) is shared with the app through this group; emptyDir
# volumes are made group-owned and setgid.
fsGroup: {{ .Values.runAsGroup }}
fsGroupChangePolicy: OnRootMismatch
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* The drain: the kubelet's grace is the preStop sleep, the drain and the revocations. */}}
{{- define "sidekey.terminationGracePeriodSeconds" -}}
{{- add .Values.drain.preStopSleepSeconds .Values.drain.timeoutSeconds .Values.drain.revokeSeconds -}}
{{- end -}}

{{/* sidekey.yaml: .Values.config with the keys the chart owns filled in. */}}
{{- define "sidekey.config" -}}
{{- $cfg := deepCopy .Values.config -}}
{{- if not (kindIs "map" $cfg) -}}{{- fail "config: must be a mapping (the contents of sidekey.yaml)" -}}{{- end -}}
{{- $identity := dict -}}
{{- if hasKey $cfg "identity" -}}{{- $identity = index $cfg "identity" -}}{{- end -}}
{{- if .Values.spiffe.enabled -}}
{{- $want := printf "unix://%s/%s" (trimSuffix "/" .Values.spiffe.mountPath) .Values.spiffe.socketName -}}
{{- if and (hasKey $identity "workload_api") (ne (toString (index $identity "workload_api")) $want) -}}
{{- fail (printf "config.identity.workload_api: the chart sets it to %s from spiffe.mountPath and spiffe.socketName; remove it from config" $want) -}}
{{- end -}}
{{- $_ := set $identity "workload_api" $want -}}
{{- end -}}
{{- $_ := set $cfg "identity" $identity -}}
{{- if hasKey $cfg "vault" -}}
{{- $auth := index $cfg "vault" "auth" | default dict -}}
{{- $method := toString (index $auth "method") -}}
{{- if or (eq $method "jwt") (eq $method "kubernetes") -}}
{{- $want := printf "%s/token" (trimSuffix "/" .Values.vault.tokenMountPath) -}}
{{- if and (hasKey $auth "token_file") (ne (toString (index $auth "token_file")) $want) -}}
{{- fail (printf "config.vault.auth.token_file: the chart mounts the projected service-account token at %s; remove token_file from config" $want) -}}
{{- end -}}
{{- $_ := set $auth "token_file" $want -}}
{{- end -}}
{{- end -}}
{{- $admin := printf "%s:%d" .Values.admin.listenHost (int .Values.admin.port) -}}
{{- if and (hasKey $cfg "admin") (ne (toString (index $cfg "admin" "listen")) $admin) -}}
{{- fail (printf "config.admin.listen: the chart sets it to %s from admin.listenHost and admin.port (the probes use it); remove admin from config" $admin) -}}
{{- end -}}
{{- $_ := set $cfg "admin" (dict "listen" $admin) -}}
{{- if hasKey $cfg "audit" -}}
{{- fail "config.audit: the chart sets it from audit.volume (none: JSON lines on standard output); remove audit from config" -}}
{{- end -}}
{{- if .Values.audit.volume -}}
{{- $_ := set $cfg "audit" (dict "file" (printf "%s/audit.jsonl" (trimSuffix "/" .Values.audit.mountPath))) -}}
{{- end -}}
{{- include "sidekey.checkListeners" (dict "root" . "services" (index $cfg "services")) -}}
{{- toYaml $cfg -}}
{{- end -}}

{{/*
Refuse listeners that cannot work, or would be unsafe, in the chosen mode: a gateway's
listeners must be reachable on the pod's address; a sidecar's must not be (client_auth: local
treats every caller as the local_identity, so only the pod itself may reach it).
*/}}
{{- define "sidekey.checkListeners" -}}
{{- $mode := .root.Values.mode -}}
{{- if not (kindIs "slice" .services) -}}{{- fail "config.services: must be a list of services" -}}{{- end -}}
{{- range $i, $s := .services -}}
{{- $listen := toString (index $s "listen") -}}
{{- $auth := toString (default "mtls" (index $s "client_auth")) -}}
{{- if eq $mode "gateway" -}}
{{- if or (hasPrefix "unix:" $listen) (not (regexMatch "^(0\\.0\\.0\\.0|\\[::\\]|::):[0-9]+$" $listen)) -}}
{{- fail (printf "config.services[%d].listen: %s is not reachable by other pods; a gateway listens on 0.0.0.0:PORT" $i $listen) -}}
{{- end -}}
{{- if eq $auth "local" -}}
{{- fail (printf "config.services[%d].client_auth: local is for a sidecar (mode: sidecar); a gateway's callers prove themselves with mtls or jwt" $i) -}}
{{- end -}}
{{- else -}}
{{- if not (or (hasPrefix "unix:" $listen) (regexMatch "^(127\\.[0-9.]+|localhost|\\[::1\\]):[0-9]+$" $listen)) -}}
{{- fail (printf "config.services[%d].listen: %s would be reachable from outside the pod; a sidecar listens on unix:%s/... or 127.0.0.1:PORT" $i $listen $.root.Values.sidecar.socketDir) -}}
{{- end -}}
{{- if and (hasPrefix "unix:" $listen) (not (hasPrefix (printf "unix:%s/" (trimSuffix "/" $.root.Values.sidecar.socketDir)) $listen)) -}}
{{- fail (printf "config.services[%d].listen: %s is not in sidecar.socketDir (%s), the directory the app shares" $i $listen $.root.Values.sidecar.socketDir) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The TCP ports of the gateway's listeners, as a list of dicts {name, port}. */}}
{{- define "sidekey.listenerPorts" -}}
{{- $ports := list -}}
{{- range $i, $s := .Values.config.services -}}
{{- $listen := toString (index $s "listen") -}}
{{- if not (hasPrefix "unix:" $listen) -}}
{{- $port := regexFind "[0-9]+$" $listen | int -}}
{{- $ports = append $ports (dict "name" (index $s "name") "port" $port "index" $i) -}}
{{- end -}}
{{- end -}}
{{- toJson $ports -}}
{{- end -}}

{{- define "sidekey.configMapName" -}}
{{- printf "%s-config" (include "sidekey.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The broker's container: the gateway's only container, or the app pod's native sidecar. */}}
{{- define "sidekey.brokerContainer" -}}
- name: sidekey
  image: {{ include "sidekey.image" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  {{- if eq .Values.mode "sidecar" }}
  # A native sidecar: started before the app containers (once its startup probe passes) and
  # stopped after them.
  restartPolicy: Always
  {{- end }}
  command: [sidekey]
  args:
    - run
    - --config
    - /etc/sidekey/sidekey.yaml
    - --drain-timeout
    - {{ .Values.drain.timeoutSeconds | quote }}
    - --log-format
    - json
  {{- if eq .Values.mode "gateway" }}
  {{- $ports := include "sidekey.listenerPorts" . | fromJsonArray }}
  ports:
    {{- range $ports }}
    - name: {{ printf "listen-%d" (int .index) }}
      containerPort: {{ .port }}
      protocol: TCP
    {{- end }}
    - name: admin
      containerPort: {{ .Values.admin.port }}
      protocol: TCP
  {{- else }}
  ports:
    - name: admin
      containerPort: {{ .Values.admin.port }}
      protocol: TCP
  {{- end }}
  env:
    # Nothing is written outside the mounted /tmp and the audit volume.
    - name: TMPDIR
      value: /tmp
    - name: HOME
      value: /tmp
    {{- if .Values.audit.volume }}
    - name: POD_NAME
      valueFrom:
        fieldRef: {fieldPath: metadata.name}
    {{- end }}
  startupProbe:
    httpGet: {path: /readyz, port: admin}
    periodSeconds: 2
    timeoutSeconds: {{ .Values.probes.timeoutSeconds }}
    failureThreshold: {{ .Values.probes.startupFailureThreshold }}
  readinessProbe:
    httpGet: {path: /readyz, port: admin}
    periodSeconds: {{ .Values.probes.periodSeconds }}
    timeoutSeconds: {{ .Values.probes.timeoutSeconds }}
    failureThreshold: 2
  livenessProbe:
    httpGet: {path: /healthz, port: admin}
    periodSeconds: {{ .Values.probes.periodSeconds }}
    timeoutSeconds: {{ .Values.probes.timeoutSeconds }}
    failureThreshold: {{ .Values.probes.livenessFailureThreshold }}
  lifecycle:
    preStop:
      sleep:
        seconds: {{ .Values.drain.preStopSleepSeconds }}
  resources:
    {{- if eq .Values.mode "gateway" }}
    {{- toYaml .Values.gateway.resources | nindent 4 }}
    {{- else }}
    {{- toYaml .Values.sidecar.resources | nindent 4 }}
    {{- end }}
  securityContext:
    runAsUser: {{ .Values.runAsUser }}
    runAsGroup: {{ .Values.runAsGroup }}
    {{- include "sidekey.containerSecurityContext" . | nindent 4 }}
  volumeMounts:
    - name: sidekey-config
      mountPath: /etc/sidekey
      readOnly: true
    - name: tmp
      mountPath: /tmp
    {{- if .Values.spiffe.enabled }}
    - name: spiffe-workload-api
      mountPath: {{ .Values.spiffe.mountPath }}
      readOnly: true
    {{- end }}
    {{- if include "sidekey.vaultTokenProjected" . }}
    - name: vault-token
      mountPath: {{ .Values.vault.tokenMountPath }}
      readOnly: true
    {{- end }}
    {{- if eq .Values.mode "sidecar" }}
    - name: sidekey-sockets
      mountPath: {{ .Values.sidecar.socketDir }}
    {{- end }}
    {{- if .Values.audit.volume }}
    # One directory per pod on the volume: replicas never share an audit file.
    - name: audit
      mountPath: {{ .Values.audit.mountPath }}
      subPathExpr: $(POD_NAME)
    {{- end }}
    {{- with .Values.extraVolumeMounts }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end -}}

{{- define "sidekey.vaultTokenProjected" -}}
{{- if hasKey .Values.config "vault" -}}
{{- $method := toString (index .Values.config "vault" "auth" "method") -}}
{{- if or (eq $method "jwt") (eq $method "kubernetes") -}}true{{- end -}}
{{- end -}}
{{- end -}}

{{/* The volumes of the broker's container. */}}
{{- define "sidekey.brokerVolumes" -}}
- name: sidekey-config
  configMap:
    name: {{ include "sidekey.configMapName" . }}
- name: tmp
  emptyDir:
    medium: Memory
    sizeLimit: 16Mi
{{- if .Values.spiffe.enabled }}
- name: spiffe-workload-api
  {{- if eq .Values.spiffe.source "csi" }}
  csi:
    driver: csi.spiffe.io
    readOnly: true
  {{- else if eq .Values.spiffe.source "hostPath" }}
  hostPath:
    path: {{ .Values.spiffe.hostPath }}
    type: Directory
  {{- else }}
  {{- fail (printf "spiffe.source: must be csi or hostPath, got %v" .Values.spiffe.source) }}
  {{- end }}
{{- end }}
{{- if include "sidekey.vaultTokenProjected" . }}
- name: vault-token
  projected:
    sources:
      - serviceAccountToken:
          audience: {{ .Values.vault.tokenAudience }}
          expirationSeconds: {{ .Values.vault.tokenExpirationSeconds }}
          path: token
{{- end }}
{{- if eq .Values.mode "sidecar" }}
- name: sidekey-sockets
  emptyDir:
    medium: Memory
    sizeLimit: 1Mi
{{- end }}
{{- if .Values.audit.volume }}
- name: audit
  {{- toYaml .Values.audit.volume | nindent 2 }}
{{- end }}
{{- with .Values.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end -}}
