{{/* The chart name. */}}
{{- define "tenant-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The prefix of every object's name. */}}
{{- define "tenant-operator.fullname" -}}
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

{{- define "tenant-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "tenant-operator.labels" -}}
helm.sh/chart: {{ include "tenant-operator.chart" . }}
{{ include "tenant-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Labels that select the operator's pods. */}}
{{- define "tenant-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tenant-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The ServiceAccount the operator runs as. */}}
{{- define "tenant-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "tenant-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The image reference. */}}
{{- define "tenant-operator.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The ServiceAccount of backup and restore Jobs. */}}
{{- define "tenant-operator.backupServiceAccountName" -}}
{{- default (printf "%s-backup" (include "tenant-operator.fullname" .)) .Values.backup.serviceAccountName -}}
{{- end -}}

{{/* The name of PgBouncer's objects. */}}
{{- define "tenant-operator.pgbouncer.fullname" -}}
{{- printf "%s-pgbouncer" (include "tenant-operator.fullname" . | trunc 53 | trimSuffix "-") -}}
{{- end -}}

{{/* Labels that select PgBouncer's pods: a name of their own, so that no
selector of the operator (Deployment, metrics Service, PDB) takes them. */}}
{{- define "tenant-operator.pgbouncer.selectorLabels" -}}
app.kubernetes.io/name: {{ printf "%s-pgbouncer" (include "tenant-operator.name" . | trunc 53 | trimSuffix "-") }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Labels on PgBouncer's objects. */}}
{{- define "tenant-operator.pgbouncer.labels" -}}
helm.sh/chart: {{ include "tenant-operator.chart" . }}
{{ include "tenant-operator.pgbouncer.selectorLabels" . }}
app.kubernetes.io/component: pgbouncer
app.kubernetes.io/part-of: {{ include "tenant-operator.name" . }}
app.kubernetes.io/version: {{ .Values.pgbouncer.image.tag | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* PgBouncer's configuration: transaction pooling with the session reset
after every transaction, as scripts/with-pgbouncer.sh runs it for the tests
(docs/data-path.md). Fails rendering without a gateway or a database host. */}}
{{- define "tenant-operator.pgbouncer.ini" -}}
{{- if not .Values.gateway.role -}}
{{- fail "pgbouncer.enabled needs the gateway login: PgBouncer authenticates as it (Secret tenant-gateway-db); set gateway.role (default tenancy_gateway) or disable pgbouncer" -}}
{{- end -}}
{{- $host := required "pgbouncer.databaseHost is required when pgbouncer.enabled: the Postgres host PgBouncer connects to (e.g. --set pgbouncer.databaseHost=postgres.db.svc)" .Values.pgbouncer.databaseHost -}}
[databases]
; Every database name is routed to the one Postgres.
* = host={{ $host }} port={{ int .Values.pgbouncer.databasePort }}

[pgbouncer]
listen_addr = *
listen_port = 6432
unix_socket_dir =
; Clients log in as the gateway with its password (SCRAM); PgBouncer logs
; in to Postgres with the same credentials, from userlist.txt, which the
; init container writes from Secret tenant-gateway-db. No auth_query: it
; needs a SECURITY DEFINER function over pg_shadow, i.e. a superuser.
auth_type = scram-sha-256
auth_file = /etc/pgbouncer-auth/userlist.txt
pool_mode = transaction
default_pool_size = {{ int .Values.pgbouncer.poolSize }}
max_client_conn = {{ int .Values.pgbouncer.maxClientConnections }}
; sqlx sends extra_float_digits; libpq clients may send options.
ignore_startup_parameters = extra_float_digits,options
; After every transaction (not only at session end): DISCARD ALL drops
; what application code may have left at session level (SET without LOCAL,
; SET ROLE, prepared statements, temp tables, advisory locks), so nothing
; reaches the next request even when code bypasses the library.
server_reset_query = DISCARD ALL
server_reset_query_always = 1
; A server connection that served many tenants holds their catalog caches;
; docs/data-path.md, "Catalog memory", explains how to choose this.
server_lifetime = {{ int .Values.pgbouncer.serverLifetime }}
server_idle_timeout = {{ int .Values.pgbouncer.serverIdleTimeout }}
{{- end -}}
